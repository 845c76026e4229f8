"""The run folder on disk: the lock, state.json, and atomic, verified checkpoints."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from job.spec import SpecError

CHECKPOINT_PREFIX = "step-"
# step-NNNNNNNN after a whole step; step-NNNNNNNN-MMMM after MMMM micro-batches of the next one (a signal mid-step).
# Names sort in training order.
CHECKPOINT_NAME = re.compile(r"step-\d{8}(-\d{4})?")
MANIFEST = "manifest.json"


class RunLock:
    """An exclusive lock on a run folder that the operating system drops when its holder dies, even by kill -9."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.handle = None

    def __enter__(self) -> RunLock:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise SpecError([f"{self.path.parent}: already in use by {holder}; two processes never write one run folder"]) from None
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


# Checkpoints ------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Everything a later start needs to continue exactly: tensors for safetensors, plain values for JSON."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    progress: dict  # step, micro-step, epoch, cursor, best metric, threads, ...
    rng: list[dict]  # one entry a process: python/numpy states (plain) and torch states (tensors)
    grads: list[dict[str, torch.Tensor]]  # one entry a process: gradients accumulated within the current step
    scaler: dict | None = None  # fp16's gradient scaler: the loss scale and its growth tracker


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name))


def save_checkpoint(run_dir: Path, ckpt: Checkpoint, keep_last: int) -> Path:
    """Write into a temporary folder, fsync each file, write the manifest last, rename, then prune old ones."""
    parent = run_dir / "checkpoints"
    parent.mkdir(exist_ok=True)
    micro = ckpt.progress.get("micro_in_step", 0)
    final = parent / (f"{CHECKPOINT_PREFIX}{ckpt.step:08d}" + (f"-{micro:04d}" if micro else ""))
    tmp = parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(ckpt.trainable, tmp / "adapter.safetensors")
    torch.save({"optimizer": ckpt.optimizer, "scheduler": ckpt.scheduler, "scaler": ckpt.scaler}, tmp / "optimizer.pt")
    torch_rng = {}
    plain_rng = []
    for rank, state in enumerate(ckpt.rng):
        plain_rng.append({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})
        torch_rng.update({f"{rank}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    save_file(torch_rng, tmp / "rng.safetensors")
    save_file({f"{rank}.{name}": g for rank, grads in enumerate(ckpt.grads) for name, g in grads.items()}, tmp / "grads.safetensors")
    write_json_atomic(tmp / "rng.json", plain_rng)
    write_json_atomic(tmp / "progress.json", ckpt.progress)
    files = sorted(p for p in tmp.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    for path in files:
        _fsync(path)
    write_json_atomic(tmp / MANIFEST, {"step": ckpt.step, "files": {p.name: _sha256(p) for p in files}})
    if final.exists():  # a checkpoint of this step that failed verification earlier: keep it aside, never delete
        final.rename(parent / f".rejected-{final.name}-{int(time.time())}")
    tmp.rename(final)
    _fsync(parent)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def verify(folder: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "manifest is not valid JSON"
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match its sha256"
    return None


def load_checkpoint(folder: Path) -> Checkpoint:
    """Load a verified checkpoint; nothing in it can execute code."""
    tensors = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    torch_rng = load_file(folder / "rng.safetensors")
    plain_rng = json.loads((folder / "rng.json").read_text())
    rng = []
    for rank, plain in enumerate(plain_rng):
        state = dict(plain)
        prefix = f"{rank}."
        state.update({k[len(prefix):]: v for k, v in torch_rng.items() if k.startswith(prefix)})
        rng.append(state)
    progress = json.loads((folder / "progress.json").read_text())
    grads = [{} for _ in plain_rng]
    for key, tensor in load_file(folder / "grads.safetensors").items():
        rank, name = key.split(".", 1)
        grads[int(rank)][name] = tensor
    return Checkpoint(
        step=progress["step"],
        trainable=load_file(folder / "adapter.safetensors"),
        optimizer=tensors["optimizer"],
        scheduler=tensors["scheduler"],
        progress=progress,
        rng=rng,
        grads=grads,
        scaler=tensors.get("scaler"),
    )


def newest_good_checkpoint(run_dir: Path, on_rejected=None) -> Path | None:
    """The newest checkpoint that verifies; a bad one is moved aside (never deleted) and reported."""
    for folder in reversed(checkpoint_dirs(run_dir)):
        problem = verify(folder)
        if problem is None:
            return folder
        aside = folder.with_name(f".rejected-{folder.name}-{int(time.time())}")
        folder.rename(aside)
        if on_rejected is not None:
            on_rejected(folder, aside, problem)
    return None


def capture_rng() -> dict:
    """This process's random state: Python and NumPy as plain values, torch (CPU and every CUDA device) as tensors."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{index}"] = cuda_state
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"cuda{index}" in state:
                torch.cuda.set_rng_state(state[f"cuda{index}"], index)
