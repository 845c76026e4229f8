"""Checkpoints: the training state a resume restores, written atomically and verified before it is loaded."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from job.rundir import file_sha256, write_json_atomic

CHECKPOINT_PREFIX = "step-"
# step-NNNNNNNN after a whole step; step-NNNNNNNN-MMMM after MMMM micro-batches of the next one (a signal mid-step).
# Names sort in training order.
CHECKPOINT_NAME = re.compile(r"step-\d{8}(-\d{4})?")
MANIFEST = "manifest.json"


@dataclass
class TrainingState:
    """Where training stands: everything a resume restores besides tensors and random states, saved and loaded whole
    as a checkpoint's progress.json. Every process holds the same values (validation loss is reduced over all)."""

    step: int = 0  # optimizer steps done
    micro_in_step: int = 0  # micro-batches of the next step whose gradients are kept (a stop inside a step)
    partial_loss: float = 0.0  # their summed loss, on this process
    partial_losses: list[float] = field(default_factory=list)  # every process's, as the checkpoint saved them
    # [from step, micro-batches over all processes]: the bad batches that rollbacks left behind
    skips: list[list[int]] = field(default_factory=list)
    lr_scale: float = 1.0  # what rollbacks have multiplied the learning rate by
    bad_streak: list[int] = field(default_factory=lambda: [0, 0])  # [first bad step, bad steps in a row]
    best_val_loss: float | None = None
    best_step: int | None = None
    stale_evals: int = 0  # evaluations in a row without improvement (early stopping)
    processes: int = 1
    threads: int = 1  # torch's CPU threads: another count changes float sums, and so the result
    # How the steps are computed (mixed_precision, compile, liger): kept, or the result would differ. None: a
    # checkpoint from before this was recorded, trained as this start would.
    speed: dict | None = None

    def first_batch(self, at_step: int, batches_per_step: int) -> int:
        """The micro-batch (counted over all processes) that begins optimizer step at_step, past any batches a
        rollback skipped."""
        return at_step * batches_per_step + sum(shift for start, shift in self.skips if at_step >= start)

    def to_progress(self, batches_per_step: int, order) -> dict:
        """progress.json: the state, and where the data order stands (for people; a resume recomputes it)."""
        batch = self.first_batch(self.step, batches_per_step) + self.micro_in_step * self.processes
        return {
            "step": self.step, "micro_in_step": self.micro_in_step, "partial_loss": self.partial_loss,
            "partial_losses": self.partial_losses,
            "batch": batch, "sequence": batch * order.micro_batch, "epoch": round(order.epochs_at(batch), 4),
            "skips": self.skips, "lr_scale": self.lr_scale,
            "bad_streak": self.bad_streak, "best_val_loss": self.best_val_loss, "best_step": self.best_step,
            "stale_evals": self.stale_evals, "processes": self.processes, "threads": self.threads,
            "speed": None if self.speed is None else dict(self.speed),
        }

    @classmethod
    def from_progress(cls, progress: dict) -> TrainingState:
        """The state in a checkpoint's progress.json, from this version or an older one (missing fields default)."""
        known = cls.__dataclass_fields__
        state = cls(**{key: value for key, value in progress.items() if key in known})
        if "batch" not in progress:
            # Before the order was one stream, a skip counted micro-steps of one micro-batch on every process.
            state.skips = [[start, shift * state.processes] for start, shift in state.skips]
        return state


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
    save_file({f"{rank}.{name}": g for rank, grads in enumerate(ckpt.grads) for name, g in grads.items()},
              tmp / "grads.safetensors")
    write_json_atomic(tmp / "rng.json", plain_rng)
    write_json_atomic(tmp / "progress.json", ckpt.progress)
    files = sorted(p for p in tmp.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    for path in files:
        _fsync(path)
    write_json_atomic(tmp / MANIFEST, {"step": ckpt.step, "files": {p.name: file_sha256(p) for p in files}})
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
        if file_sha256(path) != digest:
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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"cuda{index}" in state:
                torch.cuda.set_rng_state(state[f"cuda{index}"], index)
