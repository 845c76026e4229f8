"""What the loop does when a step goes wrong: run out of memory, fail to compile, or keep producing non-finite losses.

Each is a plain function the loop calls; none of them decides when it is called."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from job import hardware, log, rundir, track
from job.checkpoint import TrainingState
from job.session import Session, main_decides, newest_checkpoint, restore, scale_rates
from job.spec import JobSpec, SpecError, build_spec, spec_to_dict

# What a failed step starts again from --------------------------------------------------------------------------


@dataclass
class RetryPoint:
    """The random states and the gradients just before a step: a retry starts from them as if nothing had failed."""

    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    grads: dict[str, torch.Tensor]


def retry_point(session: Session) -> RetryPoint | None:
    """None with several processes: the others would wait for the failed one's gradients forever."""
    if session.world > 1:
        return None
    return RetryPoint(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                      {n: p.grad.clone() for n, p in session.trainable.items() if p.grad is not None})


def rewind_to(session: Session, point: RetryPoint) -> None:
    session.optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(point.rng)
    if point.cuda_rng is not None:
        torch.cuda.set_rng_state_all(point.cuda_rng)
        torch.cuda.empty_cache()
    for name, grad in point.grads.items():
        session.trainable[name].grad = grad.clone()


def out_of_memory(err: BaseException) -> bool:
    """torch's own error (CUDA, MPS), or the CPU allocator's RuntimeError."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                      and "can't allocate memory" in str(err))


def compile_failed(session: Session, err: BaseException) -> bool:
    return session.forward_model is not session.model and not out_of_memory(err)


def describe_error(err: BaseException) -> str:
    # Two lines: a compile error's first only names the backend, its second says what went wrong.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {' '.join(lines[:2])}"[:400]


# A compile failure ------------------------------------------------------------------------------------------------


def fall_back_to_eager(session: Session, state: TrainingState, error: str) -> None:
    """Train eagerly from here on, in this start and every later one (they read the plan and the checkpoints)."""
    log.get().warning("torch.compile failed: training eagerly from here on", step=state.step, error=error)
    session.forward_model = session.model
    state.speed["compile"] = session.plan.compile = False
    if session.is_main:
        session.records.event("compile_failed", step=state.step, error=error)
        track.write_config(session.run_dir, session.given, session.spec, session.plan, session.manifest,
                           session.train_pack, session.val_pack, session.total_steps, session.world,
                           session.tokenized_from_cache)


# Out of memory -----------------------------------------------------------------------------------------------------


def split_micro_batches(session: Session, state: TrainingState, error: str) -> None:
    """Run each micro-batch in twice as many parts (the same sequences a step, so the schedule stays as planned), or,
    at one sequence a part, fail the start with what would fit."""
    spec, run_dir, run_state = session.spec, session.run_dir, session.run_state
    micro_batch = spec.train.micro_batch_size
    if session.splits >= micro_batch:
        message = (f"train.micro_batch_size: out of memory at step {state.step} with 1 sequence of "
                   f"{spec.data.context_length} tokens a forward pass ({error}); {what_would_fit(spec)}")
        if session.is_main:
            run_state.status = "failed"
            run_state.errors = (run_state.errors + [message])[-10:]
            rundir.write_state(run_dir, run_state)
            track.event(run_dir, "error", error=message, step=state.step)
        raise SpecError([message])
    session.splits *= 2
    per_forward = -(-micro_batch // session.splits)
    grad_accum = spec.train.grad_accum * session.splits
    log.get().warning("out of memory: retrying the step with a smaller micro-batch", step=state.step,
                      micro_batch=per_forward, grad_accum=grad_accum, error=error)
    if session.is_main:
        # The split lasts across restarts: state.json keeps it.
        run_state.micro_batch_splits = session.splits
        rundir.write_state(run_dir, run_state)
        track.event(run_dir, "out_of_memory", step=state.step, micro_batch=per_forward, grad_accum=grad_accum,
                    error=error)


def what_would_fit(spec: JobSpec) -> str:
    """The advice of an out-of-memory exit: the plan this machine would make if context and quantization were auto."""
    tree = spec_to_dict(spec)
    tree["data"]["context_length"] = "auto"
    tree["data"]["max_context_length"] = spec.data.context_length
    tree["train"]["micro_batch_size"] = 1
    tree["train"]["gradient_checkpointing"] = "auto"
    tree["quantization"]["mode"] = "auto"
    try:
        plan = hardware.plan_for(build_spec(tree))
    except SpecError:
        plan = None
    if plan is None or not plan.fits:
        return "nothing this machine has fits by the memory estimate: use a smaller model or a larger device"
    advice = [
        f"data.context_length: {plan.context_length}" if plan.context_length != spec.data.context_length else None,
        f"quantization.mode: {plan.quantization}" if plan.quantization != spec.quantization.mode else None,
        "train.gradient_checkpointing: true"
        if plan.gradient_checkpointing and not spec.train.gradient_checkpointing else None,
    ]
    advice = [a for a in advice if a]
    if not advice:
        return "the memory estimate says it should fit: lower train.memory_fraction, or free the device's memory"
    return f"by the memory estimate this would fit: {', '.join(advice)} (job plan shows the estimate)"


# Non-finite losses --------------------------------------------------------------------------------------------------


def rollback_due(session: Session, state: TrainingState) -> bool:
    """A streak of train.max_bad_steps non-finite steps in a row."""
    return state.bad_streak[1] >= session.spec.train.max_bad_steps


def roll_back(session: Session, state: TrainingState) -> TrainingState:
    """The state to go on from after a streak of non-finite steps: the newest checkpoint's, reading past the bad
    batches, at a lower learning rate. Without a checkpoint the run goes on from here, the bad batches consumed."""
    spec = session.spec
    rollbacks = main_decides(session, session.run_state.rollbacks if session.is_main else 0)
    first_bad, count = state.bad_streak
    if rollbacks >= spec.train.max_rollbacks:
        raise RuntimeError(f"non-finite loss or gradients in {count} steps in a row after {rollbacks} rollbacks "
                           "(train.max_rollbacks); lower optim.lr or check the data")
    folder = newest_checkpoint(session)
    skipped = count * session.batches_per_step
    if folder is not None:
        state = restore(session, folder)
        # Steps replayed from the checkpoint read past the bad batches.
        state.skips = state.skips + [[first_bad, skipped]]
    state.lr_scale *= spec.train.rollback_lr_factor
    state.bad_streak = [0, 0]
    scale_rates(session, state)
    if session.is_main:
        session.run_state.rollbacks += 1
        session.records.event("rollback", to_step=state.step, checkpoint=folder.name if folder else None,
                              skipped_micro_batches=skipped, lr_scale=state.lr_scale)
        log.get().warning("rolled back", to_step=state.step, lr_scale=state.lr_scale)
    return state
