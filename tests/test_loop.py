"""The loop's parts, called one by one in this process on the tiny model: a step, settling its figures, evaluation,
a checkpoint and its restore, a stop request, and each recovery."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from job import hardware, log, model, recovery, rundir, track, train
from job import session as sessions
from job.checkpoint import TrainingState
from job.spec import build_spec

from .conftest import tiny_spec


def open_session(repo: Path, out: Path, **sections) -> tuple[sessions.Session, TrainingState]:
    """What run() builds before its loop, for a fresh run or the run already in out."""
    given = build_spec(tiny_spec(repo, out, **{"log": {"every_steps": 1}, **sections}))
    log.configure(given.log.format)  # onto this test's stderr, as run() does
    plan = hardware.plan_for(given)
    spec = hardware.resolve(given, plan)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    run_state = rundir.read_state(spec.run_dir) or rundir.RunState()
    session = sessions.start(given, spec, plan, "", train.make_accelerator("no"), spec.run_dir, run_state,
                             sessions.StopSignal(), track.RunRecords.open(spec.run_dir))
    state, _ = train.resume(session)
    session.model.train()
    session.forward_model = session.model
    return session, state


def figures_of(session: sessions.Session) -> train.StepFigures:
    return train.StepFigures(no_scale=torch.full((), float("nan"), device=session.device))


def weights(session: sessions.Session) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in session.trainable.items()}


def events(session: sessions.Session) -> list[dict]:
    return rundir.read_jsonl(session.run_dir / "events.jsonl")


def test_a_step_trains_and_its_figures_wait_on_the_device_until_settled(tmp_path, code_repo):
    session, state = open_session(code_repo, tmp_path)
    figures, before = figures_of(session), weights(session)
    assert train.take_step(session, state, figures) is True
    assert state.step == 1 and (state.micro_in_step, state.partial_loss) == (0, 0.0)
    assert [p.index for p in figures.pending] == [0]
    assert any(not torch.equal(before[n], p) for n, p in session.trainable.items())
    assert rundir.read_jsonl(session.run_dir / "metrics.jsonl") == []  # nothing read back yet
    assert train.settle(session, state, figures) is False
    [record] = rundir.read_jsonl(session.run_dir / "metrics.jsonl")
    assert (record["step"], record["split"]) == (1, "train") and record["loss"] > 0 and record["grad_norm"] > 0
    assert figures.pending == [] and figures.tokens == 0  # the window restarts after a logged step


def test_a_stop_inside_a_step_is_kept_in_the_state_and_its_checkpoint(tmp_path, code_repo):
    session, state = open_session(code_repo, tmp_path, train={"grad_accum": 3, "micro_batch_size": 2})
    session.stop.signum = signal.SIGTERM
    assert train.take_step(session, state, figures_of(session)) is False
    assert (state.step, state.micro_in_step) == (0, 1) and state.partial_loss > 0
    grads = {n: p.grad.clone() for n, p in session.trainable.items() if p.grad is not None}
    assert grads
    sessions.save(session, state)
    folder = session.run_dir / "checkpoints" / "step-00000000-0001"
    written = json.loads((folder / "progress.json").read_text())
    assert written == state.to_progress(session.batches_per_step, session.order)

    again, restored = open_session(code_repo, tmp_path, train={"grad_accum": 3, "micro_batch_size": 2})
    assert restored == state
    assert all(torch.equal(again.trainable[n].grad, g) for n, g in grads.items())


def test_a_restored_session_takes_the_same_next_steps_bit_for_bit(tmp_path, code_repo):
    sections = {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "train": {"grad_accum": 2, "micro_batch_size": 2}}
    session, state = open_session(code_repo, tmp_path, **sections)
    figures = figures_of(session)
    for _ in range(2):
        train.take_step(session, state, figures)
    train.settle(session, state, figures)
    sessions.save(session, state)
    for _ in range(2):
        train.take_step(session, state, figures)
    uninterrupted = weights(session)

    again, restored = open_session(code_repo, tmp_path, **sections)
    assert restored.step == 2
    for _ in range(2):
        train.take_step(again, restored, figures_of(again))
    assert all(torch.equal(uninterrupted[n], p) for n, p in again.trainable.items())


def test_a_streak_of_nonfinite_steps_asks_for_a_rollback_that_returns_the_checkpoint_state(tmp_path, code_repo):
    session, state = open_session(code_repo, tmp_path, train={"max_bad_steps": 1, "max_rollbacks": 1},
                                  debug={"nonfinite_micro_batches": [2]})
    figures = figures_of(session)
    for _ in range(2):
        train.take_step(session, state, figures)
    assert train.settle(session, state, figures) is False
    sessions.save(session, state)
    train.take_step(session, state, figures)
    assert train.settle(session, state, figures) is True
    assert state.step == 3 and state.bad_streak == [2, 1]

    rolled = recovery.roll_back(session, state)
    assert (rolled.step, rolled.skips, rolled.lr_scale, rolled.bad_streak) == (2, [[2, 1]], 0.5, [0, 0])
    assert [g["lr"] for g in session.optimizer.param_groups] == [r * 0.5 for r in session.scheduler.get_last_lr()]
    assert rolled.first_batch(2, 1) == 3  # the step replayed reads past the bad micro-batch
    assert [e["event"] for e in events(session)] == ["checkpoint", "nonfinite_loss", "rollback"]
    assert [(e["to_step"], e["checkpoint"]) for e in events(session) if e["event"] == "rollback"] == \
        [(2, "step-00000002")]
    assert [r["step"] for r in rundir.read_jsonl(session.run_dir / "metrics.jsonl")] == [1, 2]  # step 3 rewound
    assert train.take_step(session, rolled, figures) is True
    assert train.settle(session, rolled, figures) is False

    session.run_state.rollbacks = 1  # train.max_rollbacks spent: the next streak fails the run
    rolled.bad_streak = [3, 1]
    with pytest.raises(RuntimeError, match=r"after 1 rollbacks \(train.max_rollbacks\)"):
        recovery.roll_back(session, rolled)


def test_evaluation_keeps_the_best_adapter_and_counts_stale_evaluations(tmp_path, code_repo):
    session, state = open_session(code_repo, tmp_path, eval={"early_stopping": {"patience": 2, "min_delta": 100.0}})
    assert train.evaluate(session, state, 0) is False
    assert (state.best_step, state.stale_evals) == (0, 0)
    assert json.loads((session.run_dir / "best" / "best.json").read_text())["step"] == 0
    # The same weights again: no drop below the best, let alone of more than min_delta.
    assert train.evaluate(session, state, 0) is False and state.stale_evals == 1
    assert train.evaluate(session, state, 0) is True and state.stale_evals == 2
    val = [r for r in rundir.read_jsonl(session.run_dir / "metrics.jsonl") if r["split"] == "val"]
    assert [r["stale_evals"] for r in val] == [0, 1, 2] and len({r["loss"] for r in val}) == 1
    assert session.run_state.best_val_loss == state.best_val_loss == val[0]["loss"]


def test_a_stop_request_comes_from_a_real_signal(tmp_path, code_repo):
    session, _ = open_session(code_repo, tmp_path)
    with sessions.StopSignal() as stop:
        session.stop = stop
        assert sessions.stop_requested(session) is False
        os.kill(os.getpid(), signal.SIGTERM)
        assert sessions.stop_requested(session) is True and stop.signum == signal.SIGTERM


def test_out_of_memory_retries_the_step_in_smaller_parts(tmp_path, code_repo):
    session, state = open_session(code_repo, tmp_path, debug={"out_of_memory_steps": [0]})
    figures = figures_of(session)
    assert train.take_step(session, state, figures) is True
    assert state.step == 1 and session.splits == 2 and session.run_state.micro_batch_splits == 2
    assert [(e["step"], e["micro_batch"], e["grad_accum"]) for e in events(session) if e["event"] == "out_of_memory"] \
        == [(0, 2, 2)]
    assert train.settle(session, state, figures) is False


def test_a_compile_failure_falls_back_to_eager_for_good(tmp_path, code_repo):
    session, state = open_session(code_repo, tmp_path, train={"compile": True}, debug={"compile_fails": True})
    session.forward_model = model.compile_for_training(session.model, session.spec)
    assert train.take_step(session, state, figures_of(session)) is True
    assert session.forward_model is session.model and state.speed["compile"] is False
    assert session.plan.compile is False
    assert json.loads((session.run_dir / "config.json").read_text())["plan"]["compile"] is False
    assert [e["step"] for e in events(session) if e["event"] == "compile_failed"] == [0]


def test_the_whole_loop_keeps_the_adapter_every_so_many_steps(tmp_path, code_repo):
    """train.run in this process: checkpoint.adapter_every_steps is one predicate and one call in the loop. The
    adapter kept after step 4 is the checkpoint's weights of that step, and stock peft loads it."""
    from peft import PeftModel
    from safetensors.torch import load_file

    spec = build_spec(tiny_spec(code_repo, tmp_path, checkpoint={"every_steps": 4, "adapter_every_steps": 2}))
    threads = torch.get_num_threads()
    try:
        assert train.run(spec, "") == 0
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "t"
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["step-00000002", "step-00000004"]
    kept = load_file(run / "adapters" / "step-00000004" / "adapter_model.safetensors")
    checkpointed = load_file(run / "checkpoints" / "step-00000004" / "adapter.safetensors")
    checkpointed = {name.replace(".default.", "."): tensor for name, tensor in checkpointed.items()}
    assert kept.keys() == checkpointed.keys() and all(torch.equal(kept[n], checkpointed[n]) for n in kept)
    base = model.load_base_model(run / "model", spec, torch.float32, torch.device("cpu"))
    loaded = PeftModel.from_pretrained(base, run / "adapters" / "step-00000002")
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) > 0
