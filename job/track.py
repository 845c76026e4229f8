"""What a run writes for people and tools to read: config.json, metrics.jsonl, events.jsonl, plots."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import sys
import time
from pathlib import Path

LIBRARIES = ["torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "pydantic", "bitsandbytes"]


def versions() -> dict[str, str | None]:
    found = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


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


def event(run_dir: Path, kind: str, **fields) -> None:
    append_jsonl(run_dir / "events.jsonl", {"time": time.time(), "event": kind, **fields})


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def write_plots(run_dir: Path) -> list[Path]:
    """plots/loss.png, lr.png and syntax.png from metrics.jsonl alone; each written to a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", alpha=0.6, linewidth=1)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], label="validation", marker="o", linewidth=2)
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, folder / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    groups = sorted({name for r in train for name in r.get("lr", {})})
    for name in groups:
        points = [(r["step"], r["lr"][name]) for r in train if name in r.get("lr", {})]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate per parameter group")
    if groups:
        ax.set_yscale("log")
        ax.legend()
    ax.grid(alpha=0.3, which="both")
    written.append(_save(fig, folder / "lr.png"))

    rated = [r for r in val if r.get("syntax_rate") is not None]
    if rated:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax.plot([r["step"] for r in rated], [100 * r["syntax_rate"] for r in rated], marker="o", linewidth=2)
        ax.set(xlabel="optimizer step", ylabel="samples that parse (%)", ylim=(-5, 105),
               title=f"Syntax rate of sample completions ({rated[-1]['syntax_samples']} samples an evaluation)")
        ax.grid(alpha=0.3)
        written.append(_save(fig, folder / "syntax.png"))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def truncate_after(path: Path, step: int) -> None:
    """Keep only the records up to step: a resume writes the later ones again, once."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    tmp.replace(path)


def write_config(run_dir: Path, spec, precision: str, manifest: dict, train_pack, val_pack, total_steps: int,
                 processes: int, cached: bool) -> None:
    """config.json: the resolved spec, the plan, the machine, library versions and the data summary."""
    from job import hardware
    from job.checkpoint import write_json_atomic
    from job.spec import spec_to_dict

    write_json_atomic(run_dir / "config.json", {
        "spec": spec_to_dict(spec),
        "plan": {
            "total_steps": total_steps,
            "processes": processes,
            "mixed_precision": precision,
            "sequences_per_step": spec.train.micro_batch_size * spec.train.grad_accum * processes,
            "tokens_per_step": spec.train.micro_batch_size * spec.train.grad_accum * processes * spec.data.context_length,
        },
        "hardware": hardware.describe(),
        "versions": versions(),
        "data": {
            **manifest,
            "sequences": {"train": len(train_pack), "val": len(val_pack)},
            "target_tokens": {"train": train_pack.useful_tokens, "val": val_pack.useful_tokens},
            "tokenized_from_cache": cached,
        },
    })
