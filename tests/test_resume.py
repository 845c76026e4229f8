"""Interruptions with real processes and real signals: the result must equal that of an uninterrupted run."""

import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.rundir import read_jsonl

from .conftest import PRECISIONS, PROJECT, job_command, project_env, run_job, tiny_spec, write_spec

pytestmark = pytest.mark.slow

STEPS = 12


def spec_for(code_repo, out: Path, **sections) -> dict:
    base = {"train": {"max_steps": STEPS, "micro_batch_size": 4}, "eval": {"every_steps": 4, "max_batches": 2},
            "checkpoint": {"every_steps": 3, "keep_last": 2}, "lora": {"dropout": 0.1}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return tiny_spec(code_repo, out, **base)


def start(spec_path: Path, precision: str = "no", **popen) -> subprocess.Popen:
    env = project_env()
    return subprocess.Popen(job_command(precision) + ["run", "--spec", str(spec_path)], cwd=PROJECT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def stopped_once(spec_path: Path, ready) -> None:
    """Start the job, send SIGTERM once ready() holds, and expect the checkpoint-and-stop exit code."""
    process = start(spec_path)
    wait_for(ready, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 75


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]


def comparable(run: Path) -> list[tuple]:
    """The figures that must not change with interruptions (not times or speeds)."""
    return [(r["split"], r["step"], r["loss"], json.dumps(r.get("lr")), r.get("grad_norm"), r.get("loss_scale"),
             r.get("skipped")) for r in read_jsonl(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run that every interrupted run is compared with."""
    root = tmp_path_factory.mktemp("reference")
    repo = root / "repo"
    import shutil

    shutil.copytree(PROJECT / "job", repo / "job", ignore=shutil.ignore_patterns("__pycache__"))
    result = run_job("run", "--spec", str(write_spec(root / "job.yaml", spec_for(repo, root / "runs"))))
    assert result.returncode == 0, result.stderr
    return repo, root / "runs" / "t"


def samples(run: Path) -> list[tuple]:
    return [(r["step"], r["index"], r["prompt"], r["completion"], r["verdict"])
            for r in read_jsonl(run / "samples.jsonl")]


def same_result(run: Path, reference_run: Path) -> None:
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert comparable(run) == comparable(reference_run)
    assert samples(run) == samples(reference_run) and samples(run)
    assert train_steps(run) == list(range(1, STEPS + 1))


def test_sigterm_checkpoints_exits_75_and_resumes_to_the_same_adapter(tmp_path, reference):
    repo, reference_run = reference
    spec_path = write_spec(tmp_path / "job.yaml", spec_for(repo, tmp_path / "runs"))
    run = tmp_path / "runs" / "t"
    process = start(spec_path)
    wait_for(lambda: len(train_steps(run)) >= 5, process)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr[-2000:]
    assert time.monotonic() - sent < 5
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "stopped"
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    assert events[-2:] == ["checkpoint", "stopped"]

    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0, result.stderr
    same_result(run, reference_run)
    events = read_jsonl(run / "events.jsonl")
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["checkpoint"] == f"checkpoints/step-{state['step']:08d}"
    assert json.loads((run / "state.json").read_text())["restarts"] == 1
    # Plots and report after the resume: valid images drawn from one record a step (same_result checked those).
    from .test_tracking import valid_png

    for name in ("loss", "lr", "grad_norm", "throughput", "memory", "syntax"):
        assert valid_png(run / "plots" / f"{name}.png"), name
    assert "completed" in (run / "report.html").read_text()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sigterm_in_the_middle_of_gradient_accumulation(tmp_path, precision):
    """With accumulation, the partial gradients are saved and the resumed run matches an uninterrupted one, bit for
    bit, in every precision. Under fp16 the gradients of micro-batch 2 overflow: step 1 is skipped and the loss scale
    halves, so a resume that lost the scaler's state would compute (and record) every later step with another scale."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(PROJECT / "job", repo / "job", ignore=shutil.ignore_patterns("__pycache__"))
    spec = spec_for(repo, tmp_path / "a", train={"max_steps": 6, "grad_accum": 4, "micro_batch_size": 2,
                                                 "mixed_precision": precision},
                    debug={"overflow_micro_batches": [2] if precision == "fp16" else []})
    reference = run_job("run", "--spec", str(write_spec(tmp_path / "a.yaml", spec)), launcher=job_command(precision))
    assert reference.returncode == 0, reference.stderr[-3000:]
    # The interrupted run also asks for deterministic algorithms: on the CPU they change nothing, bit for bit.
    spec["run"]["output_dir"] = str(tmp_path / "b")
    spec["train"]["deterministic"] = True
    spec_path = write_spec(tmp_path / "b.yaml", spec)
    run = tmp_path / "b" / "t"
    process = start(spec_path, precision)
    wait_for(lambda: len(train_steps(run)) >= 2, process)
    time.sleep(0.15)  # somewhere inside the next step's micro-batches
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr[-2000:]
    resumed = run_job("run", "--spec", str(spec_path), launcher=job_command(precision))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference_run = tmp_path / "a" / "t"
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert comparable(run) == comparable(reference_run)
    state = json.loads((run / "state.json").read_text())
    if precision == "fp16":
        train = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
        scales = [(r["step"], r["loss_scale"], r.get("skipped")) for r in train]
        assert scales[:2] == [(1, 65536.0, "gradient overflow"), (2, 32768.0, None)]
        assert {scale for _, scale, _ in scales[1:]} == {32768.0}
        assert (state["overflow_steps"], state["bad_steps"], state["rollbacks"]) == (1, 0, 0)
        overflows = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "gradient_overflow"]
        assert [(e["step"], e["loss_scale"]) for e in overflows] == [(1, 65536.0)]


def test_sigkill_at_random_moments(tmp_path, reference):
    repo, reference_run = reference
    # Many kills may land before a start gets past a checkpoint; that is what this test is about, not the budget.
    spec_path = write_spec(tmp_path / "job.yaml", spec_for(repo, tmp_path / "runs", run={"max_restarts": 50}))
    run = tmp_path / "runs" / "t"
    chooser = random.Random(1234)
    # Kill moments scale with this machine's speed: within the first 70% of the reference run's time from its start
    # event to its completion, so that a start is killed before it can finish.
    times = {e["event"]: e["time"] for e in read_jsonl(reference_run / "events.jsonl")}
    span = 0.7 * (times["complete"] - times["start"])
    kills = 0
    for _ in range(4):
        starts = len(read_jsonl(run / "events.jsonl"))
        process = start(spec_path)
        # Once this start is training, kill it at a random moment: inside steps, evaluations and checkpoint writes.
        while process.poll() is None and len(read_jsonl(run / "events.jsonl")) == starts:
            time.sleep(0.02)
        time.sleep(chooser.uniform(0.0, span))  # the first evaluation, steps, checkpoints
        if process.poll() is not None:
            break
        process.kill()
        process.communicate()
        kills += 1
    final = run_job("run", "--spec", str(spec_path))
    assert final.returncode == 0, final.stderr
    assert kills >= 2
    same_result(run, reference_run)


def test_a_corrupted_newest_checkpoint_is_set_aside(tmp_path, reference):
    repo, reference_run = reference
    spec_path = write_spec(tmp_path / "job.yaml", spec_for(repo, tmp_path / "runs"))
    run = tmp_path / "runs" / "t"
    stopped_once(spec_path, lambda: len(list((run / "checkpoints").glob("step-*"))) >= 2)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    blob = bytearray((newest / "adapter.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (newest / "adapter.safetensors").write_bytes(bytes(blob))
    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0, result.stderr
    rejected = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "checkpoint_rejected"]
    assert rejected and rejected[0]["checkpoint"] == newest.name and "sha256" in rejected[0]["problem"]
    assert list((run / "checkpoints").glob(f".rejected-{newest.name}-*"))  # kept, never deleted
    same_result(run, reference_run)


def test_spec_changes_that_alter_the_result_are_refused(tmp_path, reference):
    repo, _ = reference
    spec = spec_for(repo, tmp_path / "runs")
    spec_path = write_spec(tmp_path / "job.yaml", spec)
    run = tmp_path / "runs" / "t"
    stopped_once(spec_path, lambda: (run / "config.json").is_file() and len(train_steps(run)) >= 1)
    refused = run_job("run", "--spec", str(spec_path), "--set", "optim.lr=0.1", "--set", "lora.r=8",
                      "--set", "train.compile=false", "--set", "train.mixed_precision=bf16")
    assert refused.returncode == 2
    assert "lora.r, optim.lr, train.compile, train.mixed_precision changed" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    # The checkpoint records how its steps were computed: a start that would compute them otherwise is refused,
    # even when config.json (which later starts take the precision from) was edited behind the run's back.
    config = json.loads((run / "config.json").read_text())
    edited = {**config, "plan": {**config["plan"], "mixed_precision": "bf16"}}
    (run / "config.json").write_text(json.dumps(edited))
    refused = run_job("run", "--spec", str(spec_path))
    assert refused.returncode == 2
    assert "train.mixed_precision: step-" in refused.stderr
    assert "was trained with no, this start would use bf16" in refused.stderr
    (run / "config.json").write_text(json.dumps(config))
    accepted = run_job("run", "--spec", str(spec_path), "--set", "eval.every_steps=5", "--set", "log.every_steps=2")
    assert accepted.returncode == 0, accepted.stderr


def test_a_compile_failure_falls_back_to_eager_with_the_same_result(tmp_path, reference):
    repo, reference_run = reference
    # The reference ran with compile auto, in full precision on the CPU: compiling never pays there, as recorded.
    plan = json.loads((reference_run / "config.json").read_text())["plan"]
    assert plan["mixed_precision"] == "no" and plan["compile"] is False
    assert any(reason.startswith("compile off") for reason in plan["reasons"])
    records = [r for r in read_jsonl(reference_run / "metrics.jsonl") if r["split"] == "train"]
    assert len(records) == STEPS and all(r["tokens_per_s"] > 0 and r["tokens"] > 0 for r in records)

    spec_path = write_spec(tmp_path / "job.yaml", spec_for(repo, tmp_path / "runs", train={"compile": True},
                                                          debug={"compile_fails": True}))
    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "t"
    failed = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "compile_failed"]
    assert len(failed) == 1 and failed[0]["step"] == 0 and "debug.compile_fails" in failed[0]["error"]
    from job.track import schema_problems

    assert [p for e in read_jsonl(run / "events.jsonl") for p in schema_problems(e, "events")] == []
    assert result.stderr.count("torch.compile failed") == 1
    # The failed attempt changed nothing: from the first step on, the run is the eager one, bit for bit.
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert comparable(run) == comparable(reference_run)
    config = json.loads((run / "config.json").read_text())
    assert config["spec"]["train"]["compile"] is True and config["plan"]["compile"] is False  # later starts stay eager


def test_a_completed_run_answers_fast(tmp_path, reference):
    _, reference_run = reference
    spec_path = reference_run.parent.parent / "job.yaml"
    begin = time.monotonic()
    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0 and "already complete" in result.stderr
    assert time.monotonic() - begin < 5


def test_a_second_process_on_the_same_run_is_refused(tmp_path, reference):
    repo, _ = reference
    spec_path = write_spec(tmp_path / "job.yaml", spec_for(repo, tmp_path / "runs", train={"max_steps": 400}))
    run = tmp_path / "runs" / "t"
    process = start(spec_path)
    try:
        wait_for(lambda: len(train_steps(run)) >= 1, process)
        second = run_job("run", "--spec", str(spec_path))
        assert second.returncode == 2
        assert f"pid {process.pid} on host" in second.stderr
    finally:
        process.kill()
        process.communicate()
    # the kill released the lock: a new start proceeds
    third = start(spec_path)
    wait_for(lambda: sum(e["event"] in ("start", "resume") for e in read_jsonl(run / "events.jsonl")) >= 2, third)
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=60) == 75


def test_the_restart_budget_ends_in_exit_3(tmp_path, reference):
    repo, _ = reference
    spec_path = write_spec(tmp_path / "job.yaml", spec_for(repo, tmp_path / "runs", run={"max_restarts": 1}))
    run = tmp_path / "runs" / "t"
    stopped_once(spec_path, lambda: len(train_steps(run)) >= 1)
    (run / "model" / "model.safetensors").write_bytes(b"not a model any more")  # every start now fails, as a bug would
    codes = [run_job("run", "--spec", str(spec_path)).returncode for _ in range(3)]
    assert codes == [1, 1, 3]
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "failed" and "max_restarts" in state["errors"][-1]
    # Sticky: a restart policy that restarts on any exit code gets 3 again at once, without training.
    again = run_job("run", "--spec", str(spec_path))
    assert again.returncode == 3 and "raise it to try again" in again.stderr
    assert json.loads((run / "state.json").read_text()) == state


def test_a_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, reference):
    repo, reference_run = reference
    spec_path = write_spec(tmp_path / "job.yaml", spec_for(repo, tmp_path / "runs"))
    run = tmp_path / "runs" / "t"
    stopped_once(spec_path, lambda: len(list((run / "checkpoints").glob("step-*"))) >= 1)
    good = sorted((run / "checkpoints").glob("step-*"))

    def small_files():
        limit = 16 * 1024  # smaller than a checkpoint's tensors, larger than the logs
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing

    limited = start(spec_path, preexec_fn=small_files)
    _, stderr = limited.communicate(timeout=300)
    assert limited.returncode == 1, stderr[-2000:]
    assert sorted((run / "checkpoints").glob("step-*")) == good
    assert json.loads((run / "state.json").read_text())["status"] == "failed"
    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0, result.stderr
    same_result(run, reference_run)


def test_nonfinite_losses_are_skipped_then_rolled_back(tmp_path, reference):
    repo, reference_run = reference
    # Micro-batches 7 and 8 (steps 8 and 9) give NaN: two skipped steps, then a rollback to step 6 past them.
    spec = spec_for(repo, tmp_path / "runs", train={"max_bad_steps": 2}, debug={"nonfinite_micro_batches": [7, 8]})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    events = read_jsonl(run / "events.jsonl")
    assert [e["event"] for e in events if e["event"] in ("nonfinite_loss", "rollback")] == \
        ["nonfinite_loss", "nonfinite_loss", "rollback"]
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["to_step"] == 6 and rollback["skipped_micro_batches"] == 2 and rollback["lr_scale"] == 0.5
    state = json.loads((run / "state.json").read_text())
    assert (state["status"], state["bad_steps"], state["rollbacks"]) == ("completed", 2, 1)
    train = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)) and not any("skipped" in r for r in train)
    ref = {r["step"]: r for r in read_jsonl(reference_run / "metrics.jsonl") if r["split"] == "train"}
    for r in train:
        factor = 1.0 if r["step"] <= 6 else 0.5
        assert r["lr"]["lora_A"] == pytest.approx(factor * ref[r["step"]]["lr"]["lora_A"])
        if r["step"] <= 6:
            assert r["loss"] == ref[r["step"]]["loss"]


def test_nonfinite_losses_past_the_rollback_cap_fail_the_run(tmp_path, reference):
    repo, _ = reference
    spec = spec_for(repo, tmp_path / "runs", train={"max_bad_steps": 2, "max_rollbacks": 1},
                    debug={"nonfinite_micro_batches": list(range(7, 40))})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 1
    state = json.loads((tmp_path / "runs" / "t" / "state.json").read_text())
    assert state["status"] == "failed" and state["rollbacks"] == 1 and "max_rollbacks" in state["errors"][-1]


FIXTURE = PROJECT / "tests" / "fixtures" / "checkpoint-ba5eb59"


def test_a_run_stopped_before_the_loop_was_rebuilt_resumes_bit_for_bit(tmp_path):
    """tests/fixtures/checkpoint-ba5eb59 was written by the job before its loop was rebuilt: a run that rolled back
    (skips, a halved rate), kept its best loss and stale evaluations, and was stopped by SIGTERM one micro-batch into
    step 8. Today's code reads every field of that checkpoint, writes it back the same, and resumes from it to the
    same adapter however often it is interrupted again."""
    from job.checkpoint import TrainingState

    progress = json.loads((FIXTURE / "runs/t/checkpoints/step-00000007-0001/progress.json").read_text())
    state = TrainingState.from_progress(progress)
    assert state == TrainingState(
        step=7, micro_in_step=1, partial_loss=778.7857055664062, skips=[[3, 4]], lr_scale=0.5, bad_streak=[0, 0],
        best_val_loss=6.145856342618427, best_step=6, stale_evals=3, processes=1, threads=2,
        speed={"mixed_precision": "no", "compile": False, "liger": False})
    from job.data import DataOrder

    # Written back the same, with the data order's position in the stream in place of the old epoch cursor.
    written = state.to_progress(batches_per_step=4, order=DataOrder(0, 175, 2))
    assert {k: v for k, v in written.items() if k not in ("batch", "sequence", "epoch", "partial_losses")} == \
        {k: v for k, v in progress.items() if k not in ("micro_step", "cursor", "epoch")}
    assert (written["batch"], written["sequence"], written["epoch"]) == (progress["micro_step"], 66, 0.3771)

    runs = {}
    for name in ("whole", "interrupted"):
        runs[name] = tmp_path / name
        shutil.copytree(FIXTURE, runs[name])
    resumed = run_job("run", "--spec", "job.yaml", cwd=runs["whole"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = runs["whole"] / "runs" / "t"
    events = read_jsonl(whole / "events.jsonl")
    assert [(e["event"], e["step"], e["micro_in_step"], e["checkpoint"]) for e in events if e["event"] == "resume"] \
        == [("resume", 7, 1, "checkpoints/step-00000007-0001")]
    assert train_steps(whole) == list(range(1, 13))

    run = runs["interrupted"] / "runs" / "t"
    process = subprocess.Popen([sys.executable, "-m", "job", "run", "--spec", "job.yaml"], cwd=runs["interrupted"],
                               env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: max(train_steps(run)) >= 9, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr[-2000:]
    again = run_job("run", "--spec", "job.yaml", cwd=runs["interrupted"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (whole / "adapter" / "adapter_model.safetensors").read_bytes()
    assert comparable(run) == comparable(whole)
