"""Reading run folders without touching them: `job status` and `job compare`.

Nothing here writes into a run folder or takes its lock, so it is safe while a run is writing; readers
tolerate a half-written last line and a state.json that is being replaced.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from job.rundir import read_jsonl
from job.spec import SpecError, changed_fields

TAIL_BYTES = 64 * 1024  # enough of metrics.jsonl for the recent step rate, however long the run


@dataclass
class RunSummary:
    """What `job status` prints for one run folder."""

    path: str
    name: str
    status: str  # running, stopped, completed, failed, interrupted (running, but no process holds it), corrupt
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    syntax_rate: float | None = None
    restarts: int = 0
    errors: list[str] = field(default_factory=list)
    updated: float | None = None
    age_s: float | None = None
    eta_s: float | None = None
    early_stopped: bool = False
    problem: str | None = None  # why a corrupt run could not be read

    @property
    def progress(self) -> float | None:
        return self.step / self.total_steps if self.total_steps else None


def is_run_folder(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "config.json").is_file() or (path / "job.yaml").is_file()


def find_runs(path: Path) -> list[Path]:
    """PATH itself when it is a run folder, else the run folders directly inside it, by name."""
    if is_run_folder(path):
        return [path]
    if not path.is_dir():
        return []
    return sorted(child for child in path.iterdir()
                  if child.is_dir() and not child.name.startswith(".") and is_run_folder(child))


def read_tail_jsonl(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict]:
    """The complete records among the last max_bytes of a JSONL file (a torn first or last line is left out)."""
    try:
        with path.open("rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            stream.seek(max(0, size - max_bytes))
            chunk = stream.read()
    except OSError:
        return []
    lines = chunk.split(b"\n")
    if size > max_bytes:
        lines = lines[1:]  # the first line is most likely cut
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def held_locks() -> set[tuple[int, int]] | None:
    """(device, inode) of every file with a flock held on this machine, from /proc/locks; None where unknown."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    held = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; a blocked waiter's line has "->" as its second field.
        if len(parts) >= 6 and parts[1] == "FLOCK":
            try:
                major, minor, inode = parts[5].split(":")
                held.add((os.makedev(int(major, 16), int(minor, 16)), int(inode)))
            except ValueError:
                continue
    return held


def seconds_per_step(records: list[dict]) -> float | None:
    """Median wall seconds between consecutive train records of the same start, per step."""
    train = [r for r in records if r.get("split") == "train" and isinstance(r.get("time"), (int, float))]
    rates = []
    for before, after in zip(train, train[1:]):
        steps = after.get("step", 0) - before.get("step", 0)
        elapsed = after["time"] - before["time"]
        if steps > 0 and 0 < elapsed < 3600 * steps:
            rates.append(elapsed / steps)
    return statistics.median(rates) if rates else None


def summarize(run_dir: Path, locks: set[tuple[int, int]] | None = None, now: float | None = None) -> RunSummary:
    now = time.time() if now is None else now
    summary = RunSummary(path=str(run_dir), name=run_dir.name, status="corrupt")
    try:
        state = json.loads((run_dir / "state.json").read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        summary.problem = "no state.json (the run never started, or it is not a run folder)"
        return summary
    except (OSError, ValueError) as err:
        summary.problem = f"state.json cannot be read: {err}"
        return summary
    for name in ("step", "total_steps", "epoch", "best_val_loss", "best_step", "restarts", "errors", "updated",
                 "early_stopped"):
        if name in state:
            setattr(summary, name, state[name])
    summary.status = str(state.get("status", "corrupt"))
    if summary.updated:
        summary.age_s = max(0.0, now - summary.updated)
    if summary.status == "running" and locks is not None:
        lock = run_dir / ".lock"
        try:
            info = lock.stat()
            if (info.st_dev, info.st_ino) not in locks:
                summary.status = "interrupted"  # killed without a chance to say so; the next start resumes
        except OSError:
            summary.status = "interrupted"
    records = read_tail_jsonl(run_dir / "metrics.jsonl")
    rated = [r for r in records if r.get("split") == "val" and r.get("syntax_rate") is not None]
    if rated:
        summary.syntax_rate = rated[-1]["syntax_rate"]
    if summary.status in ("running", "stopped", "interrupted") and summary.total_steps > summary.step:
        per_step = seconds_per_step(records)
        if per_step is not None:
            summary.eta_s = per_step * (summary.total_steps - summary.step)
    return summary


def status(path: Path) -> list[RunSummary]:
    locks = held_locks()
    now = time.time()
    return [summarize(run, locks, now) for run in find_runs(path)]


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def status_table(summaries: list[RunSummary]) -> str:
    header = ["RUN", "STATUS", "PROGRESS", "STEP", "BEST VAL", "SYNTAX", "UPDATED", "RESTARTS", "ETA"]
    rows = [header]
    for s in summaries:
        rows.append([
            s.name,
            s.status + (" (early)" if s.early_stopped else ""),
            f"{100 * s.progress:.0f}%" if s.progress is not None else "-",
            f"{s.step}/{s.total_steps}" if s.total_steps else str(s.step),
            f"{s.best_val_loss:.4f}@{s.best_step}" if s.best_val_loss is not None else "-",
            f"{100 * s.syntax_rate:.0f}%" if s.syntax_rate is not None else "-",
            format_duration(s.age_s) + " ago" if s.age_s is not None else "-",
            str(s.restarts),
            format_duration(s.eta_s),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for s in summaries:
        if s.problem:
            lines.append(f"{s.name}: {s.problem}")
    return "\n".join(lines)


def summary_json(summaries: list[RunSummary]) -> str:
    return json.dumps([{**asdict(s), "progress": s.progress} for s in summaries], indent=2)


# Comparing runs --------------------------------------------------------------------------------------------


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per (split, step), the last written: a reader of an old or crashed run never draws a step twice."""
    kept: dict[tuple, dict] = {}
    for record in records:
        kept[(record.get("split"), record.get("step"))] = record
    return sorted(kept.values(), key=lambda r: (r.get("step", 0), r.get("split") != "train"))


def tokens_seen(records: list[dict]) -> dict[int, int]:
    """Training target tokens seen up to each step, from the train records' window counts."""
    seen, total = {0: 0}, 0
    for record in records:
        if record.get("split") == "train":
            total += record.get("tokens") or 0
            seen[record["step"]] = total
    return seen


@dataclass
class RunMetrics:
    path: Path
    spec: dict
    records: list[dict]
    summary: RunSummary


def load_run(path: Path) -> RunMetrics:
    if not (path / "config.json").is_file():
        raise SpecError([f"{path}: not a run folder (no config.json)"])
    try:
        spec = json.loads((path / "config.json").read_text())["spec"]
    except (OSError, ValueError, KeyError) as err:
        raise SpecError([f"{path / 'config.json'}: cannot be read ({err})"]) from None
    return RunMetrics(path, spec, latest_per_step(read_jsonl(path / "metrics.jsonl")), summarize(path, held_locks()))


def compare_rows(runs: list[RunMetrics]) -> tuple[list[str], list[list[str]]]:
    """A table: the spec fields that differ, then final and best figures, one column a run."""
    differing: list[str] = []
    for other in runs[1:]:
        for name in changed_fields(runs[0].spec, other.spec):
            if name not in differing and name not in ("run.name", "run.output_dir"):
                differing.append(name)

    def value_at(spec: dict, dotted: str):
        node = spec
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return node

    header = ["", *[run.path.name for run in runs]]
    rows = [[name, *[json.dumps(value_at(run.spec, name)) for run in runs]] for name in sorted(differing)]

    def figures(run: RunMetrics) -> dict[str, str]:
        val = [r for r in run.records if r.get("split") == "val"]
        train = [r for r in run.records if r.get("split") == "train"]
        rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
        best = min(val, key=lambda r: r["loss"]) if val else None
        return {
            "status": run.summary.status,
            "steps": f"{run.summary.step}/{run.summary.total_steps}",
            "final val loss": f"{val[-1]['loss']:.4f}" if val else "-",
            "best val loss (step)": f"{best['loss']:.4f} ({best['step']})" if best else "-",
            "best perplexity": f"{math.exp(min(best['loss'], 700)):.2f}" if best else "-",
            "final train loss": f"{train[-1]['loss']:.4f}" if train and train[-1].get("loss") is not None else "-",
            "final syntax rate": (f"{100 * val[-1]['syntax_rate']:.0f}%"
                                  if val and val[-1].get("syntax_rate") is not None else "-"),
            **{name: (f"{val[-1][key]:.3f} ({val[-1][tasks]} tasks)" if val and val[-1].get(key) is not None else "-")
               for name, key, tasks in COMPLETION_ROWS},
            "tokens seen": f"{max(tokens_seen(run.records).values()):,}",
            "median tokens/s": f"{statistics.median(rates):,.0f}" if rates else "-",
        }

    table = [figures(run) for run in runs]
    rows += [[name, *[column[name] for column in table]] for name in table[0]]
    return header, rows


# The completion accuracy of a val record, as compare and the report show it: (row name, field, its task count).
COMPLETION_ROWS = [
    ("final next-line exact match", "next_line_exact", "next_line_tasks"),
    ("final next-line edit similarity", "next_line_edit_sim", "next_line_tasks"),
    ("final infill exact match", "infill_exact", "infill_tasks"),
    ("final infill edit similarity", "infill_edit_sim", "infill_tasks"),
    ("final infill exact match, trimmed", "infill_trimmed_exact", "infill_tasks"),
    ("final infill edit similarity, trimmed", "infill_trimmed_edit_sim", "infill_tasks"),
    ("final body edit similarity", "body_edit_sim", "body_tasks"),
    ("final body identifier F1", "body_identifier_f1", "body_identifier_tasks"),
]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])
