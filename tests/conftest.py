"""Shared fixtures: small real repositories, a tiny spec, and a way to run the CLI in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

PROJECT = Path(__file__).resolve().parent.parent

# A model small enough that a few optimizer steps take well under a second on two cores.
TINY = {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
# Every precision the job trains in, each tested on any CPU: fp16 through tests/cpu_fp16.py, which switches on the
# fp16 autocast and gradient scaler that accelerate gives a GPU.
PRECISIONS = ["no", "bf16", "fp16"]


def pytest_configure(config):
    """Under pytest-xdist (make test runs a worker a core), each worker keeps to one core of its own: every job a
    test starts then plans one thread for itself (train.cpu_threads auto), and no two workers share a core."""
    worker = getattr(config, "workerinput", None)
    if worker is not None and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker["workerid"].removeprefix("gw")) % len(cores)]})
        torch.set_num_threads(1)


@pytest.fixture
def code_repo(tmp_path: Path) -> Path:
    """A repository made of this project's own package source: real code, fixed by the commit under test."""
    repo = tmp_path / "repo"
    shutil.copytree(PROJECT / "job", repo / "job", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "README.md").write_text("# sample\n\nA small repository used by the tests of job.\n")
    return repo


def tiny_spec(repo: Path, output_dir: Path, **sections) -> dict:
    spec = {
        "run": {"name": "t", "output_dir": str(output_dir), "seed": 0},
        "data": {"repo": str(repo), "context_length": 64, "val_ratio": 0.2},
        "model": {"path": "builtin:tiny", "tiny": dict(TINY)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"lr": 0.003},
        # The precision under test never depends on the machine: full precision unless a test asks for another.
        "train": {"max_steps": 6, "micro_batch_size": 4, "mixed_precision": "no"},
        "eval": {"every_steps": 3, "max_batches": 2, "samples": 2, "max_new_tokens": 24},
        "checkpoint": {"every_steps": 4},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def project_env() -> dict[str, str]:
    """This environment with the project first on the import path (packages installed with pip --target stay on it)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}


def run_job(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it."""
    command = (launcher or [sys.executable, "-m", "job"]) + list(args)
    full_env = {**project_env(), **(env or {})}
    return subprocess.run(command, cwd=cwd or PROJECT, capture_output=True, text=True, timeout=timeout, env=full_env)


def job_command(precision: str) -> list[str]:
    """The command that runs the job in this precision on this machine (fp16 on the CPU: tests/cpu_fp16.py)."""
    if precision == "fp16" and not torch.cuda.is_available():
        return [sys.executable, str(PROJECT / "tests" / "cpu_fp16.py")]
    return [sys.executable, "-m", "job"]


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
