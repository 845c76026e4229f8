"""Validation with real runs: samples, early stopping, the best adapter, and evaluation that never changes training."""

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from job.rundir import read_jsonl

from .conftest import run_job, tiny_spec, write_spec
from .test_resume import start, wait_for

pytestmark = pytest.mark.slow


def val_records(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]


def test_a_run_that_cannot_learn_stops_after_exactly_patience_evaluations(tmp_path, code_repo):
    spec = tiny_spec(code_repo, tmp_path / "runs", optim={"lr": 0.0}, train={"max_steps": 40},
                     eval={"every_steps": 2, "early_stopping": {"patience": 3}}, checkpoint={"every_steps": 100})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    val = val_records(run)
    assert [r["step"] for r in val] == [0, 2, 4, 6]
    assert [r["stale_evals"] for r in val] == [0, 1, 2, 3]
    assert len({r["loss"] for r in val}) == 1  # a learning rate of zero: the loss cannot move
    state = json.loads((run / "state.json").read_text())
    assert (state["status"] == "completed" and state["early_stopped"] and state["step"] == 6
            and state["total_steps"] == 40)
    events = read_jsonl(run / "events.jsonl")
    assert [e["event"] for e in events][-2:] == ["early_stop", "complete"]
    assert events[-2]["step"] == 6 and events[-2]["best_step"] == 0
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 0
    best, final = (load_file(run / "best" / "adapter_model.safetensors"),
                   load_file(run / "adapter" / "adapter_model.safetensors"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)

    # The same prompts at every evaluation, and (same weights, greedy) the same completions.
    samples = [s for s in read_jsonl(run / "samples.jsonl") if s["kind"] != "next_line"]
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4, 6, 6]
    by_step = {}
    for s in samples:
        by_step.setdefault(s["step"], []).append((s["path"], s["prompt"], s["completion"], s["verdict"]))
    assert len({json.dumps(v) for v in by_step.values()}) == 1
    assert all(r["syntax_samples"] == sum(s["verdict"] != "unsupported" for s in samples if s["step"] == r["step"])
               for r in val)


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    # Checkpoints keep peft's in-memory names (with the adapter name); saved adapters leave it out.
    return {name.replace(".default.", ".").replace(".modules_to_save.", "."): t
            for name, t in load_file(folder / "adapter.safetensors").items()}


def test_best_holds_the_adapter_of_the_best_step(tmp_path, code_repo):
    # The first steps at a small rate improve; then the one-cycle peak, far too high and unclipped for a fully
    # trained output layer, ruins it: the best step is neither the first evaluation nor the last.
    spec = tiny_spec(code_repo, tmp_path / "runs", optim={"lr": 0.3, "max_grad_norm": None},
                     lora={"plus_ratio": None, "modules_to_save": ["lm_head"]},
                     schedule={"div_factor": 100.0, "pct_start": 0.5}, train={"max_steps": 8},
                     eval={"every_steps": 1, "samples": 0}, checkpoint={"every_steps": 1, "keep_last": 10})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    val = val_records(run)
    best_step = min(val, key=lambda r: r["loss"])["step"]
    info = json.loads((run / "best" / "best.json").read_text())
    assert info["step"] == best_step and info["val_loss"] == min(r["loss"] for r in val)
    assert json.loads((run / "state.json").read_text())["best_step"] == best_step
    assert 0 < best_step < 8, [round(r["loss"], 4) for r in val]
    best = load_file(run / "best" / "adapter_model.safetensors")
    saved = checkpoint_tensors(run / "checkpoints" / f"step-{best_step:08d}")
    assert best.keys() == saved.keys()
    assert all(torch.equal(best[k], saved[k]) for k in best)
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    assert not all(torch.equal(best[k], final[k]) for k in best)


def test_patience_survives_a_kill_and_resume(tmp_path, code_repo):
    spec = tiny_spec(code_repo, tmp_path / "runs", optim={"lr": 0.0}, train={"max_steps": 60},
                     eval={"every_steps": 1, "early_stopping": {"patience": 8}}, checkpoint={"every_steps": 1})
    spec_path = write_spec(tmp_path / "job.yaml", spec)
    run = tmp_path / "runs" / "t"
    process = start(spec_path)
    wait_for(lambda: len(val_records(run)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 75
    stopped_at = json.loads((run / "state.json").read_text())["step"]
    assert 2 <= stopped_at < 8

    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0, result.stderr[-3000:]
    val = val_records(run)
    # Patience counted on from where it was: the run ends at step 8 as an uninterrupted one does, not 8 after the
    # resume.
    assert [r["step"] for r in val] == list(range(9))
    assert [r["stale_evals"] for r in val] == list(range(9))
    state = json.loads((run / "state.json").read_text())
    assert state["early_stopped"] and state["step"] == 8 and state["restarts"] == 1
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")].count("early_stop") == 1


def test_evaluation_never_changes_training(tmp_path, code_repo):
    """Sampling with a temperature at every step, or no evaluation at all: the same adapter, bit for bit."""
    adapters = []
    for name, evaluation in [("quiet", {"every_steps": 100, "samples": 0, "next_lines": 0}),
                             ("busy", {"every_steps": 1, "samples": 3, "temperature": 0.9, "top_p": 0.9})]:
        spec = tiny_spec(code_repo, tmp_path / "runs", run={"name": name}, lora={"dropout": 0.1}, eval=evaluation)
        result = run_job("run", "--spec", str(write_spec(tmp_path / f"{name}.yaml", spec)))
        assert result.returncode == 0, result.stderr[-3000:]
        adapters.append((tmp_path / "runs" / name / "adapter" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]
    busy = read_jsonl(tmp_path / "runs" / "busy" / "samples.jsonl")
    assert len(busy) == (3 + 16) * 7 and not (tmp_path / "runs" / "quiet" / "samples.jsonl").exists()
