"""The training loop, top to bottom: admit the start, set up, then step, log, validate and checkpoint until done."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from job import (
    EXIT_BUDGET,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    cadence,
    hardware,
    log,
    model,
    recovery,
    report,
    rundir,
    sharding,
    track,
)
from job import session as sessions
from job.checkpoint import TrainingState
from job.data import IGNORE_INDEX
from job.evaluate import (
    body_scores,
    complete_infills,
    complete_lines,
    completion_figures,
    generate_samples,
    loss_sum,
    syntax_rate,
    validate,
)
from job.session import Session, StopSignal
from job.spec import JobSpec, SpecError, build_spec, result_changes, spec_to_dict


def run(spec: JobSpec, submitted_spec: str) -> int:
    """Run (or resume) the job; returns the process exit code."""
    log.configure(spec.log.format)
    logger = log.get()
    run_dir = spec.run_dir
    # A resumed run keeps the precision of its first start, whatever this machine would choose now.
    recorded = _recorded_plan(run_dir)
    precision = recorded.mixed_precision if recorded is not None else hardware.mixed_precision(spec)
    if spec.train.deterministic:
        hardware.use_deterministic_algorithms()
    accelerator = make_accelerator(precision)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    if accelerator.device.type == "cpu":
        # LOCAL_WORLD_SIZE is the launcher's (torchrun, accelerate) count of processes sharing this machine.
        torch.set_num_threads(hardware.cpu_threads(spec, int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    lock = contextlib.nullcontext()
    if is_main:
        rundir.ensure_writable(spec.run.output_dir)
        run_dir.mkdir(exist_ok=True)
        lock = rundir.RunLock(run_dir, spec.run.lock_wait)
        local = rundir.local_lock_reason(run_dir)
        if local:
            logger.warning("the run folder's lock keeps out only this machine's processes: never start this run on "
                           "two machines at once", reason=local)
    with lock, StopSignal() as stop:
        verdict, run_state, problems = None, None, []
        if is_main:
            try:
                verdict, run_state = _admit(spec, run_dir)
            except SpecError as err:
                problems = err.problems
        verdict, problems = broadcast_object_list([verdict, problems])
        if problems:
            raise SpecError(problems)
        if verdict is not None:
            return verdict
        plan = None
        if is_main:
            try:
                plan = _plan(spec, run_dir, world)
            except SpecError as err:
                problems = err.problems
        plan, problems = broadcast_object_list([plan, problems])
        if problems:
            raise SpecError(problems)
        resolved = hardware.resolve(spec, plan, world)
        records = track.RunRecords.open(run_dir) if is_main else None
        try:
            return _train(spec, resolved, plan, submitted_spec, accelerator, run_dir, run_state,
                          stop, records)
        except SpecError:
            raise
        except Exception as err:
            # Every rank logs its own failure: another rank's error is all that explains the main one's.
            logger.exception("run failed", run=str(run_dir), rank=accelerator.process_index)
            if is_main:
                run_state.status = "failed"
                run_state.errors = (run_state.errors + [f"{type(err).__name__}: {err}"])[-10:]
                rundir.write_state(run_dir, run_state)
                track.event(run_dir, "error", error=f"{type(err).__name__}: {err}", step=run_state.step)
            return EXIT_FAILED
        finally:
            if records is not None:
                records.close()


def make_accelerator(precision: str) -> Accelerator:
    """accelerate's devices, processes and mixed precision (autocast, and fp16's gradient scaler) for this run."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)


def _admit(spec: JobSpec, run_dir: Path) -> tuple[int | None, rundir.RunState]:
    """Decide, before any model is loaded, whether this start may train: complete, changed spec, restart budget."""
    logger = log.get()
    run_state = rundir.read_state(run_dir)
    if run_state is None:
        return None, rundir.RunState()
    if run_state.status == "completed":
        logger.info("run already complete", run=str(run_dir), step=run_state.step)
        return EXIT_OK, run_state
    config_path = run_dir / "config.json"
    if config_path.is_file():
        before = json.loads(config_path.read_text())["spec"]
        try:
            before = spec_to_dict(build_spec(before))  # fields added since the run started take their defaults
        except SpecError:
            pass
        fixed = result_changes(before, spec_to_dict(spec))
        if fixed:
            raise SpecError([f"{spec.run.name}: {', '.join(fixed)} changed since this run started, which would change "
                             "its result; start a new run with a new run.name"])
    # A start that ended neither stopped nor complete, without moving the step, counts against the budget.
    if run_state.status in ("running", "failed") and run_state.step <= run_state.start_step:
        run_state.failed_starts += 1
    else:
        run_state.failed_starts = 0
    if run_state.failed_starts > spec.run.max_restarts:
        message = (f"{run_state.failed_starts} starts in a row failed without progress "
                   f"(run.max_restarts is {spec.run.max_restarts})")
        logger.error("restart budget spent", run=str(run_dir), reason=message)
        run_state.status = "failed"
        run_state.errors = (run_state.errors + [message])[-10:]
        rundir.write_state(run_dir, run_state)
        track.event(run_dir, "budget_spent", reason=message)
        return EXIT_BUDGET, run_state
    run_state.start_step = run_state.step
    rundir.write_state(run_dir, run_state)
    return None, run_state


def _recorded_plan(run_dir: Path) -> hardware.Plan | None:
    config_path = run_dir / "config.json"
    try:
        return hardware.plan_from_dict(json.loads(config_path.read_text()).get("plan", {}))
    except (OSError, ValueError):
        return None


def _plan(spec: JobSpec, run_dir: Path, processes: int) -> hardware.Plan:
    """The plan of the run's first start, which every later start reuses: auto choices never change under a run."""
    return _recorded_plan(run_dir) or hardware.plan_for(spec, processes=processes)


def _train(given: JobSpec, spec: JobSpec, plan: hardware.Plan, submitted_spec: str, accelerator: Accelerator,
           run_dir: Path, run_state: rundir.RunState, stop: StopSignal, records: track.RunRecords | None) -> int:
    """Train with spec, the given spec with the plan's choices in place of every auto."""
    started = time.time()
    session = sessions.start(given, spec, plan, submitted_spec, accelerator, run_dir, run_state, stop, records)
    state, resumed_from = resume(session)
    announce(session, state, resumed_from)
    if state.step == 0 and state.micro_in_step == 0:
        evaluate(session, state, 0)
    session.model.train()
    # The training forward (and backward): compiled when the run says so; evaluation and sampling stay eager.
    session.forward_model = model.compile_for_training(session.model, spec) if state.speed["compile"] else session.model
    figures = StepFigures(no_scale=torch.full((), float("nan"), device=session.device))
    total = session.total_steps
    # Plots and the report take over a second to draw (matplotlib's import, then the figures): counted from the
    # start, so that a start's first step never waits for them.
    last_save = last_plots = time.monotonic()

    while state.step < total:
        if not take_step(session, state, figures):
            # A stop between micro-batches: the gradients so far go into the checkpoint instead of being thrown away.
            if settle(session, state, figures):
                state = recovery.roll_back(session, state)
                continue  # the stop is taken at the next chance
            sessions.save(session, state)
            return _stopped(session, state)
        step = state.step
        evaluates = cadence.evaluates(step, spec, total)
        # Fused AdamW skips a non-finite step on the device; any other optimizer needs each step's figures at once.
        if cadence.logs(step, spec, total) or evaluates or not session.skips_on_device:
            if settle(session, state, figures):
                state = recovery.roll_back(session, state)
                continue
        ended_early = evaluates and evaluate(session, state, step) and step < total
        sessions.write_run_state(session, state, early_stopped=ended_early)
        if session.is_main:
            rundir.heartbeat(run_dir, step, "training")
        if evaluates and step < total and not ended_early and session.is_main \
                and cadence.draws_plots(time.monotonic() - last_plots, spec):
            report.refresh(run_dir)  # the final ones are drawn once the adapter is written
            last_plots = time.monotonic()
        if cadence.keeps_adapter(step, spec, total):
            sessions.write_adapter(session, run_dir / "adapters" / f"step-{step:08d}")
        if ended_early:
            _early_stop(session, state)
            break
        if step < total:
            stopping = sessions.stop_requested(session)
            overdue = sessions.main_decides(session, cadence.save_overdue(time.monotonic() - last_save, spec))
            if stopping or cadence.saves_at(step, spec) or overdue:
                if settle(session, state, figures):
                    state = recovery.roll_back(session, state)
                    continue
                sessions.save(session, state)
                last_save = time.monotonic()
            if stopping:
                return _stopped(session, state)

    _finish(session, state, started)
    return EXIT_OK


def resume(session: Session) -> tuple[TrainingState, Path | None]:
    """Where this start begins: the newest checkpoint that verifies, or a fresh run."""
    folder = sessions.newest_checkpoint(session)
    if folder is not None:
        state = sessions.restore(session, folder)
        if session.is_main:
            session.run_state.restarts += 1
    else:
        state = sessions.fresh_state(session)
        if session.is_main:
            session.records.rewind(-1)  # an earlier start that died before its first checkpoint
    sessions.scale_rates(session, state)
    return state, folder


def announce(session: Session, state: TrainingState, resumed_from: Path | None) -> None:
    """The start (or resume) event, state.json, config.json and the start's log lines; then the trackers start."""
    if not session.is_main:
        return
    spec, run_dir, logger = session.spec, session.run_dir, log.get()
    session.records.event("resume" if resumed_from else "start", step=state.step, micro_in_step=state.micro_in_step,
                          checkpoint=str(resumed_from.relative_to(run_dir)) if resumed_from else None,
                          processes=session.world, grad_accum=spec.train.grad_accum,
                          micro_batch=-(-spec.train.micro_batch_size // session.run_state.micro_batch_splits))
    sessions.write_run_state(session, state, status="running", start_step=state.step, total_steps=session.total_steps)
    track.write_config(run_dir, session.given, spec, session.plan, session.manifest, session.train_pack,
                       session.val_pack, session.total_steps, session.world, session.tokenized_from_cache, session.fim,
                       session.headers)
    if session.given.has_auto:
        for reason in session.plan.reasons:
            logger.info("plan", reason=reason)
    logger.info("training", run=str(run_dir), steps=session.total_steps, from_step=state.step,
                train_sequences=len(session.train_pack), val_sequences=len(session.val_pack), processes=session.world,
                precision=session.accelerator.mixed_precision, compile=state.speed["compile"],
                attention=getattr(session.accelerator.unwrap_model(session.model).config, "_attn_implementation", None),
                threads=torch.get_num_threads(), context=spec.data.context_length,
                micro_batch=spec.train.micro_batch_size, grad_accum=spec.train.grad_accum,
                quantization=spec.quantization.mode, gradient_checkpointing=spec.train.gradient_checkpointing)
    session.records.start_trackers(spec)


# A step ---------------------------------------------------------------------------------------------------------


@dataclass
class PendingStep:
    """An optimizer step whose loss, gradient norm and loss scale are still on the device (read at the log cadence)."""

    index: int  # 0-based: the step this was
    loss: torch.Tensor
    grad_norm: torch.Tensor  # of the unscaled gradients: not finite when they overflowed
    loss_scale: torch.Tensor  # fp16's loss scale this step was computed with (NaN without a gradient scaler)
    tokens: int
    rates: dict
    seconds: float
    time: float


@dataclass
class StepFigures:
    """The steps whose figures are still on the device, and the logging window they are summed into once read."""

    no_scale: torch.Tensor  # a pending step's loss scale without a gradient scaler
    pending: list[PendingStep] = field(default_factory=list)
    tokens: int = 0
    loss: float = 0.0
    seconds: float = 0.0


def take_step(session: Session, state: TrainingState, figures: StepFigures) -> bool:
    """One optimizer step, from state.micro_in_step on. True when it ran to the end (state.step moved on; its
    figures are pending), False when a stop request ended it between micro-batches (state keeps what was done)."""
    spec, accelerator = session.spec, session.accelerator
    tick = time.perf_counter()
    first_batch = state.first_batch(state.step, session.batches_per_step)
    batches = [session.order.indices(first_batch + b) for b in range(session.batches_per_step)]
    # Normalise by the target tokens of the whole optimizer step on all processes: every token weighs the same.
    reads = None
    if session.fim_source is None:
        step_tokens = int(sum(session.useful_per_sequence[idx].sum() for idx in batches))
    else:  # FIM examples change the targets: every process makes the step's examples to count them
        reads = {first_batch + b: sessions.read_batch(session, first_batch + b) for b in range(len(batches))}
        step_tokens = int(sum((labels[:, 1:] != IGNORE_INDEX).sum() for _, _, labels in reads.values()))
    retry_from = recovery.retry_point(session)
    while True:
        try:
            step_loss, stopped_after = accumulate(session, state, first_batch, step_tokens, reads)
            break
        except Exception as err:  # noqa: BLE001 - anything but these two is raised again at once
            compile_failed = recovery.compile_failed(session, err)
            if retry_from is None or not (compile_failed or recovery.out_of_memory(err)):
                raise
            error = recovery.describe_error(err)
        # Outside the except block, so the failed attempt's tensors (held by the traceback) are already freed.
        if compile_failed:
            recovery.fall_back_to_eager(session, state, error)
        else:
            recovery.split_micro_batches(session, state, error)
        recovery.rewind_to(session, retry_from)
    if stopped_after is not None:
        state.micro_in_step, state.partial_loss = stopped_after, step_loss.item()
        return False
    state.micro_in_step, state.partial_loss = 0, 0.0
    if session.world > 1:
        step_loss = accelerator.reduce(step_loss, reduction="sum")
    rates = model.group_rates(session.optimizer)
    # Under fp16 this unscales the gradients first: the norm is of the true gradients, not finite if they overflowed.
    max_norm = spec.optim.max_grad_norm or float("inf")
    grad_norm = torch.as_tensor(sharding.whole(accelerator.clip_grad_norm_(list(session.trainable.values()),
                                                                           max_norm)))
    scaler = accelerator.scaler  # fp16 only; its private _get_scale_async reads the loss scale without waiting
    loss_scale = scaler._get_scale_async().clone() if scaler is not None else figures.no_scale
    finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    if scaler is not None:
        session.optimizer.step()  # the scaler skips a step whose gradients are not finite, and lowers the loss scale
    elif session.skips_on_device:
        # A non-finite step leaves weights and optimizer state untouched, as if it had not been taken.
        getattr(session.optimizer, "optimizer", session.optimizer).found_inf = (~finite).float()
        session.optimizer.step()
    elif finite.item():
        session.optimizer.step()
    session.scheduler.step()
    sessions.scale_rates(session, state)
    session.optimizer.zero_grad(set_to_none=True)
    figures.pending.append(PendingStep(state.step, step_loss, grad_norm, loss_scale, step_tokens, rates,
                                       time.perf_counter() - tick, time.time()))
    state.step += 1
    if spec.debug.record_batches and session.is_main:
        session.records.batches(state.step, [idx.tolist() for idx in batches])
    session.progress_bar.update(1)
    return True


def accumulate(session: Session, state: TrainingState, first_batch: int, step_tokens: int,
               reads: dict[int, tuple[torch.Tensor, ...]] | None = None) -> tuple[torch.Tensor, int | None]:
    """Forward and backward over the step's micro-batches from state.micro_in_step on: the summed loss, and how many
    micro-batches were done when a stop request ended the step (None: it ran to the end). reads: the micro-batches'
    tensors where take_step made them already."""
    spec, accelerator, faults = session.spec, session.accelerator, session.faults
    grad_accum, world = spec.train.grad_accum, session.world
    if state.step in faults.out_of_memory_steps:
        faults.out_of_memory_steps.discard(state.step)
        raise torch.OutOfMemoryError(f"debug.out_of_memory_steps: step {state.step} runs out of memory once")
    step_loss = torch.tensor(state.partial_loss, dtype=torch.float64, device=session.device)
    for k in range(state.micro_in_step, grad_accum):
        batch = first_batch + k * world + session.rank  # micro-step k reads `world` micro-batches, one a process
        tensors = reads[batch] if reads else sessions.read_batch(session, batch)
        parts = torch.arange(len(tensors[0])).split(-(-len(tensors[0]) // session.splits))
        for part_index, part in enumerate(parts):
            inputs, positions, labels = (to_device(tensor[part], session.device) for tensor in tensors)
            last = k == grad_accum - 1 and part_index == len(parts) - 1
            # Sharded, gradients are reduced after every micro-batch: only the adapter's are, and into each
            # process's shard, so the partial sums of a stop inside a step are the same on every process.
            with contextlib.nullcontext() if last or session.sharded else accelerator.no_sync(session.model), \
                    accelerator.autocast() if session.sharded else contextlib.nullcontext():
                # A sharded model was not prepared by accelerate, whose prepared forward brings the autocast.
                total, _ = loss_sum(session.forward_model, inputs, positions, labels, fused=spec.train.liger)
                if batch in faults.nonfinite_micro_batches:
                    total = total * float("nan")
                # DDP averages gradients over processes; scaling by world makes the result the global token mean.
                accelerator.backward(total * world / max(step_tokens, 1))
            step_loss += total.detach().double()
        if batch in faults.overflow_micro_batches:
            with torch.no_grad():
                sharding.local(next(iter(session.trainable.values())).grad).view(-1)[0] = float("inf")
        if k < grad_accum - 1 and sessions.stop_requested(session):
            return step_loss, k + 1
    return step_loss, None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned host memory makes the copy to a GPU asynchronous.
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


def settle(session: Session, state: TrainingState, figures: StepFigures) -> bool:
    """Bring the pending steps' figures to the host (one wait for the device), log them and count the non-finite
    ones, in step order. True when a streak of them calls for a rollback; the steps after it are dropped."""
    if not figures.pending:
        return False
    waited = time.perf_counter()
    read = torch.stack([torch.stack([p.loss, p.grad_norm.double(), p.loss_scale.double()])
                        for p in figures.pending]).tolist()
    figures.pending[-1].seconds += time.perf_counter() - waited  # the device's time that the launches did not show
    done, figures.pending = figures.pending, []
    for entry, (step_loss, grad_norm, loss_scale) in zip(done, read):
        at = entry.index + 1
        skipped = skip_reason(step_loss, grad_norm, session.accelerator.scaler is not None)
        if skipped is None:
            figures.loss += step_loss
            figures.tokens += entry.tokens
            state.bad_streak = [0, 0]
        elif skipped != OVERFLOW:
            state.bad_streak = [state.bad_streak[0] if state.bad_streak[1] else entry.index, state.bad_streak[1] + 1]
        figures.seconds += entry.seconds
        if cadence.logs(at, session.spec, session.total_steps) or skipped:
            if session.is_main:
                record = train_record(session, state, figures, entry, grad_norm, loss_scale, skipped)
                session.records.metric(record)
                if record["loss"] is not None:
                    session.progress_bar.set_postfix(loss=f"{record['loss']:.3f}")
            figures.tokens, figures.loss, figures.seconds = 0, 0.0, 0.0
        if skipped is not None:
            count_skipped(session, state, at, skipped, loss_scale)
            if skipped != OVERFLOW and recovery.rollback_due(session, state):
                return True
    return False


OVERFLOW = "gradient overflow"


def skip_reason(step_loss: float, grad_norm: float, scaled: bool) -> str | None:
    """Why a step was skipped, or None for a step taken."""
    if math.isfinite(step_loss) and math.isfinite(grad_norm):
        return None
    # fp16 gradients overflow now and then by design: the scaler skips the step and lowers the loss scale, so such a
    # step is counted but never starts a rollback. A non-finite loss, or non-finite gradients without a scaler, are
    # bad steps.
    if math.isfinite(step_loss):
        return OVERFLOW if scaled else "non-finite gradient"
    return "non-finite loss"


def train_record(session: Session, state: TrainingState, figures: StepFigures, entry: PendingStep, grad_norm: float,
                 loss_scale: float, skipped: str | None) -> dict:
    """The metrics.jsonl record of a logged step: the window's figures up to it."""
    record = {
        "step": entry.index + 1,
        "time": entry.time,
        "split": "train",
        "epoch": sessions.epoch_at(session, state, entry.index + 1),
        "loss": figures.loss / figures.tokens if figures.tokens else None,
        "lr": entry.rates,
        "grad_norm": grad_norm if skipped is None else None,
        "tokens": figures.tokens,
        "tokens_per_s": figures.tokens / figures.seconds if figures.seconds > 0 else None,
        "peak_memory_bytes": hardware.peak_memory_bytes(session.device),
    }
    if session.accelerator.scaler is not None:
        record["loss_scale"] = loss_scale
    if skipped:
        record["skipped"] = skipped
    return record


def count_skipped(session: Session, state: TrainingState, at: int, skipped: str, loss_scale: float) -> None:
    """state.json's count, an event and a log line for a skipped step (main process)."""
    if not session.is_main:
        return
    logger = log.get()
    if skipped == OVERFLOW:
        session.run_state.overflow_steps += 1
        session.records.event("gradient_overflow", step=at, loss_scale=loss_scale)
        logger.info("fp16 gradients overflowed: step skipped, loss scale lowered", step=at, loss_scale=loss_scale)
    else:
        session.run_state.bad_steps += 1
        session.records.event("nonfinite_loss", step=at, in_a_row=state.bad_streak[1], problem=skipped)
        logger.warning(f"{skipped}, step skipped", step=at, in_a_row=state.bad_streak[1])


# Validation, and the ways out -----------------------------------------------------------------------------------


def evaluate(session: Session, state: TrainingState, at_step: int) -> bool:
    """Validate and sample; keep the best adapter; True when early stopping says the run has ended."""
    spec, accelerator, device = session.spec, session.accelerator, session.device
    begin = time.perf_counter()
    if session.is_main:
        rundir.heartbeat(session.run_dir, at_step, "evaluating")
    # The unwrapped model: a DDP forward may broadcast buffers, and ranks run different numbers of eval batches.
    unwrapped = accelerator.unwrap_model(session.model)
    # The training step's autocast: under bf16 or fp16 the base is half width while the adapter and the modules
    # trained in full are fp32, and only autocast lets them meet (generate bypasses the prepared forward).
    with accelerator.autocast():
        result = validate(unwrapped, session.val_pack, spec.eval.batch_size or spec.train.micro_batch_size,
                          spec.eval.max_batches, device, session.rank, session.world,
                          lambda tensor: accelerator.reduce(tensor, reduction="sum"), lockstep=session.sharded)
    loss, stopping = result["loss"], spec.eval.early_stopping
    finite = math.isfinite(loss)
    best = state.best_val_loss
    # As in the Hugging Face Trainer: patience restarts only on a drop of more than min_delta below the best,
    # while any drop makes a new best.
    state.stale_evals = 0 if finite and (best is None or loss < best - stopping.min_delta) else state.stale_evals + 1
    improved = finite and (best is None or loss < best)
    if improved:
        state.best_val_loss, state.best_step = loss, at_step
    samples, lines, infills = [], [], []
    if session.is_main or session.sharded:  # sharded, every process runs the same generation (start() chose)
        with accelerator.autocast():
            samples = generate_samples(unwrapped, session.tokenizer, session.prompts, spec.eval.max_new_tokens,
                                       spec.eval.temperature, spec.eval.top_p, spec.run.seed, at_step, device,
                                       session.headers)
            lines = complete_lines(unwrapped, session.tokenizer, session.line_tasks, spec.eval.next_line_max_tokens,
                                   device, session.headers)
            infills = complete_infills(unwrapped, session.tokenizer, session.infill_tasks, session.fim,
                                       spec.eval.next_line_max_tokens, device, session.headers)
    best_info = None
    if session.is_main:
        for sample, prompt in zip(samples, session.prompts):
            sample.update(body_scores(sample, prompt))
        now = time.time()
        for sample in samples + lines + infills:
            session.records.sample({"step": at_step, "time": now, **sample})
        rate, checked = syntax_rate(samples)
        record = {"step": at_step, "time": now, "split": "val", **result, "syntax_rate": rate,
                  "syntax_samples": checked, "stale_evals": state.stale_evals,
                  **completion_figures(samples, lines, infills)}
        best_info = {"best.json": {"step": at_step, "val_loss": loss, "perplexity": result["perplexity"],
                                   "syntax_rate": rate, "syntax_samples": checked, "time": now}}
    if improved:
        sessions.write_adapter(session, session.run_dir / "best", info=best_info)
    if session.is_main:
        record["seconds"] = round(time.perf_counter() - begin, 4)
        session.records.metric(record)
        session.run_state.best_val_loss, session.run_state.best_step = state.best_val_loss, state.best_step
        log.get().info("validation", step=at_step, loss=round(loss, 4), perplexity=round(result["perplexity"], 2),
                       syntax_rate=None if rate is None else round(rate, 3), samples=checked,
                       next_line_exact=record["next_line_exact"], body_edit_sim=record["body_edit_sim"],
                       **({key: record[key] for key in ("infill_exact", "infill_trimmed_exact")} if infills else {}),
                       best_step=state.best_step, stale_evals=state.stale_evals, seconds=record["seconds"])
    return stopping.patience is not None and state.stale_evals >= stopping.patience


def _early_stop(session: Session, state: TrainingState) -> None:
    if not session.is_main:
        return
    stopping = session.spec.eval.early_stopping
    session.records.event("early_stop", step=state.step, best_step=state.best_step, best_val_loss=state.best_val_loss,
                          patience=stopping.patience, min_delta=stopping.min_delta)
    log.get().info("early stop: validation loss stopped improving", step=state.step, best_step=state.best_step,
                   best_val_loss=round(state.best_val_loss, 4) if state.best_val_loss is not None else None)


def _finish(session: Session, state: TrainingState, started: float) -> None:
    """The final adapter, plots and report; the run is complete."""
    session.progress_bar.close()
    sessions.write_adapter(session, session.run_dir / "adapter")
    if session.is_main:
        run_dir, run_state = session.run_dir, session.run_state
        report.refresh(run_dir)
        session.records.close()
        run_state.status = "completed"
        rundir.write_state(run_dir, run_state)
        session.records.event("complete", step=state.step, best_val_loss=run_state.best_val_loss,
                              best_step=run_state.best_step, early_stopped=run_state.early_stopped,
                              seconds=round(time.time() - started, 1))
        log.get().info("complete", run=str(run_dir), step=state.step, best_val_loss=run_state.best_val_loss,
                       adapter=str(run_dir / "adapter"))
    session.accelerator.wait_for_everyone()
    session.accelerator.end_training()


def _stopped(session: Session, state: TrainingState) -> int:
    if session.is_main:
        sessions.write_run_state(session, state, status="stopped")
        signum = session.stop.signum
        name = signal.Signals(signum).name if signum else "signal"
        track.event(session.run_dir, "stopped", signal=name, step=state.step)
        log.get().info("stopped after a checkpoint", signal=name, step=state.step, exit_code=EXIT_STOPPED)
    return EXIT_STOPPED
