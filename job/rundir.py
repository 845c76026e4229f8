"""The run folder's files outside the checkpoints: the lock, state.json, heartbeat.json, and the atomic JSON and
synced JSONL writes that every module uses for them."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from job.spec import SpecError


class RunLock:
    """An exclusive lock on a run folder that the operating system drops when its holder dies, even by kill -9.
    wait: seconds to wait for a holder to let go (run.lock_wait) before refusing."""

    def __init__(self, run_dir: Path, wait: float = 0.0):
        self.path = run_dir / ".lock"
        self.wait = wait
        self.handle = None

    def __enter__(self) -> RunLock:
        handle = self.path.open("a+")
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                left = deadline - time.monotonic()
                if left <= 0:
                    handle.close()
                    waited = f" (after waiting {self.wait:g} s, run.lock_wait)" if self.wait else ""
                    raise SpecError([f"{self.path.parent}: already in use by {holder}{waited}; "
                                     "two processes never write one run folder"]) from None
                time.sleep(min(1.0, left))
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


@dataclass
class RunState:
    """state.json: what a person or a supervisor needs to know about the run at a glance."""

    status: str = "running"  # running, completed, stopped, failed
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    restarts: int = 0
    start_step: int = 0  # the step this start began from
    failed_starts: int = 0  # consecutive starts that ended failed without moving the step
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient
    overflow_steps: int = 0  # fp16 steps the gradient scaler skipped because their gradients overflowed
    rollbacks: int = 0
    early_stopped: bool = False  # completed because validation stopped improving (eval.early_stopping)
    micro_batch_splits: int = 1  # parts each micro-batch runs in since an out-of-memory retry (1: as planned)
    errors: list[str] = field(default_factory=list)
    updated: float = 0.0


# FUSE file systems over object stores: flock there is only ever local to the machine that takes it.
BUCKET_MOUNTS = ("gcsfuse", "s3fs", "goofys", "rclone", "blobfuse2", "mountpoint-s3", "geesefs")


def local_lock_reason(folder: Path, mountinfo: str | None = None) -> str | None:
    """Why a lock on folder would keep out only this machine's processes, read from a mount table in the format of
    /proc/self/mountinfo (this process's, by default); None where the file system carries the lock to every machine
    (or is local to this one), or where there is no mount table to read."""
    if mountinfo is None:
        table = Path("/proc/self/mountinfo")
        if not table.is_file():
            return None
        mountinfo = table.read_text()
    target, best = str(folder.resolve()), None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        mount_point = fields[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= len(best[0])):
            options = set(fields[5].split(",")) | set(fields[dash + 3].split(",") if len(fields) > dash + 3 else [])
            best = (mount_point, fields[dash + 1], options)
    if best is None:
        return None
    mount_point, fstype, options = best
    if fstype.startswith("nfs"):
        local = sorted(options & {"nolock", "local_lock=flock", "local_lock=all"})
        if local:
            return f"{fstype} at {mount_point} is mounted with {local[0]}: its locks do not reach the server"
    if fstype.startswith("fuse.") and fstype.split(".", 1)[1] in BUCKET_MOUNTS:
        return f"{fstype} at {mount_point} is a bucket mount: its locks do not reach other machines"
    return None


def read_state(run_dir: Path) -> RunState | None:
    path = run_dir / "state.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except ValueError:
        return None
    known = RunState.__dataclass_fields__
    return RunState(**{key: value for key, value in raw.items() if key in known})


def write_state(run_dir: Path, state: RunState) -> None:
    state.updated = time.time()
    write_json_atomic(run_dir / "state.json", asdict(state))


def write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        json.dump(value, out, indent=2)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


def ensure_writable(output_dir: Path) -> None:
    """Create the output folder, or say in one line why it cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SpecError([f"run.output_dir: {output_dir} cannot be written ({err.strerror or err})"]) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON object a line, flushed and synced, so a reader never needs the writer's cooperation."""
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record, allow_nan=False, default=_plain) + "\n")
        out.flush()
        os.fsync(out.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Every complete record; a half-written last line (a writer killed mid-line) is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def heartbeat(run_dir: Path, step: int, phase: str) -> None:
    """heartbeat.json: the training loop's proof of life for `job health`. Replaced atomically, never synced: after
    a crash it only needs to be old, not durable."""
    path = run_dir / "heartbeat.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"time": time.time(), "step": step, "phase": phase, "pid": os.getpid()}) + "\n")
    tmp.replace(path)


def truncate_after(path: Path, step: int) -> None:
    """Keep only the records up to step: a resume writes the later ones again, once."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    tmp.replace(path)
