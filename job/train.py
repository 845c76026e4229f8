"""The training loop, top to bottom: set up, then step, log, validate and checkpoint until done."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm import tqdm

from job import EXIT_BUDGET, EXIT_FAILED, EXIT_OK, EXIT_STOPPED, cadence, checkpoint, data, hardware, log, model, report, track
from job.evaluate import choose_prompts, generate_samples, loss_sum, syntax_rate, validate
from job.spec import JobSpec, SpecError, build_spec, result_changes, spec_to_dict


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
class DataOrder:
    """Which sequences each process reads at each micro-step: a seeded permutation per epoch, walked by a cursor."""

    seed: int
    size: int
    micro_batch: int
    world: int
    cached_epoch: int | None = field(default=None, repr=False, compare=False)
    cached: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def micro_steps_per_epoch(self) -> int:
        return -(-self.size // (self.micro_batch * self.world))

    def permutation(self, epoch: int) -> torch.Tensor:
        # Kept for the epoch: a permutation of a large data set takes milliseconds, and every micro-step asks.
        if self.cached_epoch != epoch:
            # A prime stride keeps (seed, epoch) pairs from sharing a generator seed for any realistic epoch count.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.cached, self.cached_epoch = torch.randperm(self.size, generator=generator), epoch
        return self.cached

    def indices(self, micro_step: int, rank: int) -> torch.Tensor:
        epoch, cursor = divmod(micro_step, self.micro_steps_per_epoch)
        start = (cursor * self.world + rank) * self.micro_batch
        # The last micro-batch of an epoch wraps to the epoch's start, as torch's DistributedSampler pads.
        return self.permutation(epoch)[torch.arange(start, start + self.micro_batch) % self.size]


def load_trainable(trainable: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                   grads: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's weights and partial gradients (kept on the host) into the parameters, on their devices."""
    with torch.no_grad():
        for name, tensor in weights.items():
            param = trainable[name]
            param.copy_(tensor)
            # A parameter's gradient must live on its device: assigning a host tensor to a GPU parameter fails.
            param.grad = grads[name].to(param.device, param.dtype) if name in grads else None


def total_optimizer_steps(spec: JobSpec, order: DataOrder) -> int:
    limits = []
    if spec.train.max_steps is not None:
        limits.append(spec.train.max_steps)
    if spec.train.epochs is not None:
        limits.append(max(1, math.ceil(spec.train.epochs * order.micro_steps_per_epoch / spec.train.grad_accum)))
    return min(limits)


def prepare_inputs(spec: JobSpec, run_dir: Path, accelerator: Accelerator):
    """Data split, tokenizer, base model folder and packed tensors; the main process writes, the others read."""
    source = model.model_source(spec, run_dir)
    problems: list[str] = []
    if accelerator.is_main_process:
        try:
            split, manifest = data.build_split(spec.data, spec.run.seed, run_dir / "data", leave_out=[spec.run.output_dir])
            if source.builtin and not (source.folder / "config.json").is_file():
                model.create_tiny_model(spec, source.folder, [f.text for f in split.train])
            model.check_model_folder(source.folder, spec.model.trust_remote_code)
            tokenizer = model.load_tokenizer(source.folder, spec.model.trust_remote_code)
            train_pack, val_pack, cached = data.packed_data(split, manifest, tokenizer, spec.data.context_length, run_dir / "data" / "cache")
        except SpecError as err:
            problems = err.problems
    problems = broadcast_object_list([problems])[0]
    if problems:
        raise SpecError(problems)
    if not accelerator.is_main_process:
        split, manifest = data.build_split(spec.data, spec.run.seed, run_dir / "data")
        tokenizer = model.load_tokenizer(source.folder, spec.model.trust_remote_code)
        train_pack, val_pack, cached = data.packed_data(split, manifest, tokenizer, spec.data.context_length, run_dir / "data" / "cache")
    return source, split, manifest, tokenizer, train_pack, val_pack, cached


class StopSignal:
    """Owns the SIGTERM/SIGINT handlers: the first signal asks the loop to checkpoint and stop, a second SIGINT aborts."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # checkpoints are written atomically, so aborting never leaves a torn one
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


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
        checkpoint.ensure_writable(spec.run.output_dir)
        run_dir.mkdir(exist_ok=True)
        lock = checkpoint.RunLock(run_dir)
    with lock, StopSignal() as stop:
        verdict, state, problems = None, None, []
        if is_main:
            try:
                verdict, state = _admit(spec, run_dir)
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
        records = track.RunRecords.open(run_dir) if is_main else None
        try:
            return _train(spec, hardware.resolve(spec, plan), plan, submitted_spec, accelerator, run_dir, state, stop,
                          records)
        except SpecError:
            raise
        except Exception as err:
            # Every rank logs its own failure: another rank's error is all that explains the main one's.
            logger.exception("run failed", run=str(run_dir), rank=accelerator.process_index)
            if is_main:
                state.status = "failed"
                state.errors = (state.errors + [f"{type(err).__name__}: {err}"])[-10:]
                checkpoint.write_state(run_dir, state)
                track.event(run_dir, "error", error=f"{type(err).__name__}: {err}", step=state.step)
            return EXIT_FAILED
        finally:
            if records is not None:
                records.close()


def make_accelerator(precision: str) -> Accelerator:
    """accelerate's devices, processes and mixed precision (autocast, and fp16's gradient scaler) for this run."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)


def _admit(spec: JobSpec, run_dir: Path) -> tuple[int | None, checkpoint.RunState]:
    """Decide, before any model is loaded, whether this start may train: complete, changed spec, restart budget."""
    logger = log.get()
    state = checkpoint.read_state(run_dir)
    if state is None:
        return None, checkpoint.RunState()
    if state.status == "completed":
        logger.info("run already complete", run=str(run_dir), step=state.step)
        return EXIT_OK, state
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
    if state.status in ("running", "failed") and state.step <= state.start_step:
        state.failed_starts += 1
    else:
        state.failed_starts = 0
    if state.failed_starts > spec.run.max_restarts:
        message = f"{state.failed_starts} starts in a row failed without progress (run.max_restarts is {spec.run.max_restarts})"
        logger.error("restart budget spent", run=str(run_dir), reason=message)
        state.status = "failed"
        state.errors = (state.errors + [message])[-10:]
        checkpoint.write_state(run_dir, state)
        track.event(run_dir, "budget_spent", reason=message)
        return EXIT_BUDGET, state
    state.start_step = state.step
    checkpoint.write_state(run_dir, state)
    return None, state


def _recorded_plan(run_dir: Path) -> hardware.Plan | None:
    config_path = run_dir / "config.json"
    try:
        return hardware.plan_from_dict(json.loads(config_path.read_text()).get("plan", {}))
    except (OSError, ValueError):
        return None


def _plan(spec: JobSpec, run_dir: Path, processes: int) -> hardware.Plan:
    """The plan of the run's first start, which every later start reuses: auto choices never change under a run."""
    return _recorded_plan(run_dir) or hardware.plan_for(spec, processes=processes)


# What out-of-memory looks like: torch's own error (CUDA, MPS), or the CPU allocator's RuntimeError.
def _out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _train(given: JobSpec, spec: JobSpec, plan: hardware.Plan, submitted_spec: str, accelerator: Accelerator, run_dir: Path,
           state, stop: StopSignal, records: track.RunRecords | None) -> int:
    """Train with spec, the given spec with the plan's choices in place of every auto."""
    logger = log.get()
    precision = accelerator.mixed_precision
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    started = time.time()
    set_seed(spec.run.seed)
    if is_main:
        track.heartbeat(run_dir, state.step, "preparing")
    source, split, manifest, tokenizer, train_pack, val_pack, cached = prepare_inputs(spec, run_dir, accelerator)
    if is_main and not (run_dir / "job.yaml").exists():
        (run_dir / "job.yaml").write_text(submitted_spec)
    if is_main:
        for folder in (run_dir / "adapter", run_dir / "best"):
            model.finish_interrupted_swap(folder)
    # Prompts are chosen once a start, from the run's own split and seed: every evaluation completes the same ones.
    prompts = choose_prompts(split.val, spec.eval.samples, spec.run.seed, tokenizer, spec.data.context_length,
                             spec.eval.max_new_tokens) if is_main else []
    peft_model = model.build(source.folder, spec, hardware.base_dtype(precision), accelerator.device)
    optimizer = model.make_optimizer(peft_model, spec)
    order = DataOrder(spec.run.seed, len(train_pack), spec.train.micro_batch_size, world)
    total_steps = total_optimizer_steps(spec, order)
    if plan.compile is None:  # train.epochs: the step count was not known when the plan was made
        plan.compile, why = hardware.compile_choice(spec, precision, accelerator.device.type, total_steps)
        plan.reasons.append(why)
    # How the steps are computed: the same in every start, or the result would differ from an uninterrupted run.
    speed = {"mixed_precision": precision, "compile": plan.compile, "liger": spec.train.liger}
    scheduler = model.make_scheduler(optimizer, spec, total_steps)
    # Dropout differs between processes; every other random choice is made from the seed alone.
    torch.manual_seed(spec.run.seed + rank)
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}

    # Where this start begins: a fresh run, or the newest checkpoint that verifies.
    step, first_micro, partial_loss = 0, 0, 0.0
    skips: list[list[int]] = []  # [from_step, micro-batches skipped]: bad batches left behind by rollbacks
    lr_scale, bad_streak = 1.0, [0, 0]  # [first bad step, bad steps in a row]
    # Every process tracks these alike (validation loss is reduced over all of them), so all agree on an early stop.
    best_loss, best_step, stale_evals = None, None, 0

    def rejected(folder, aside, problem):
        logger.warning("checkpoint rejected", checkpoint=folder.name, problem=problem, moved_to=aside.name)
        records.event("checkpoint_rejected", checkpoint=folder.name, problem=problem, moved_to=aside.name)

    def newest_checkpoint() -> Path | None:
        return broadcast_object_list([checkpoint.newest_good_checkpoint(run_dir, rejected) if is_main else None])[0]

    def restore(folder: Path) -> dict:
        nonlocal step, first_micro, partial_loss, skips, lr_scale, bad_streak, best_loss, best_step, stale_evals
        saved = checkpoint.load_checkpoint(folder)
        progress = saved.progress
        if progress["processes"] != world:
            # The data order, every rank's random state and a step's partial gradients are laid out per process.
            written_by = progress["processes"]
            raise SpecError([f"{folder.name} was written by {written_by} process(es) and this start has {world}: "
                             f"resume with {written_by}, or start a new run with a new run.name"])
        load_trainable(trainable, saved.trainable, saved.grads[rank])
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        if accelerator.scaler is not None and saved.scaler is not None:
            # fp16's loss scale: a resume that started again from the initial scale would skip other steps.
            accelerator.scaler.load_state_dict(saved.scaler)
        checkpoint.restore_rng(saved.rng[rank])
        before = progress.get("speed", speed)
        for name in ("mixed_precision", "liger"):
            if before[name] != speed[name]:
                raise SpecError([f"train.{name}: {folder.name} was trained with {before[name]}, this start would use "
                                 f"{speed[name]}, which would change the run's result; start a new run with a new run.name"])
        # A start that fell back to eager after a compile failure left the rest of the run eager too.
        speed["compile"] = before["compile"]
        step, first_micro, partial_loss = progress["step"], progress["micro_in_step"], progress["partial_loss"]
        skips, lr_scale, bad_streak = progress["skips"], progress["lr_scale"], progress["bad_streak"]
        best_loss, best_step, stale_evals = progress["best_val_loss"], progress["best_step"], progress.get("stale_evals", 0)
        if accelerator.device.type == "cpu":
            torch.set_num_threads(progress["threads"])  # another thread count changes float sums, and so the result
        if is_main:
            # Records written after this checkpoint are superseded by the ones written again from it.
            records.rewind(step)
            state.best_val_loss, state.best_step = best_loss, best_step
        return progress

    resumed_from = newest_checkpoint()
    if resumed_from is not None:
        restore(resumed_from)
        if is_main:
            state.restarts += 1
    elif is_main:
        # An earlier start that died before its first checkpoint.
        records.rewind(-1)
        state.best_val_loss, state.best_step = None, None

    def micro_index(at_step: int) -> int:
        """The global micro-batch that begins optimizer step at_step, past any batches a rollback skipped."""
        return at_step * spec.train.grad_accum + sum(shift for start, shift in skips if at_step >= start)

    def scale_rates() -> None:
        # Schedulers compute each rate afresh from their own state, so scaling after every step compounds nothing.
        for group, rate in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = rate * lr_scale

    scale_rates()
    trainable_params = list(trainable.values())
    peft_model, optimizer = accelerator.prepare(peft_model, optimizer)
    device = accelerator.device
    useful_per_sequence = (train_pack.labels[:, 1:] != data.IGNORE_INDEX).sum(dim=1)
    eval_batch = spec.eval.batch_size or spec.train.micro_batch_size
    last_save = time.monotonic()

    def reduce_sum(tensor):
        return accelerator.reduce(tensor, reduction="sum")

    def evaluate_now(at_step: int) -> bool:
        """Validate and sample; keep the best adapter; True when early stopping says the run has ended."""
        nonlocal best_loss, best_step, stale_evals
        begin = time.perf_counter()
        if is_main:
            track.heartbeat(run_dir, at_step, "evaluating")
        # The unwrapped model: a DDP forward may broadcast buffers, and ranks run different numbers of eval batches.
        unwrapped = accelerator.unwrap_model(peft_model)
        # The training step's autocast: under bf16 or fp16 the base is half width while the adapter and the modules
        # trained in full are fp32, and only autocast lets them meet (generate bypasses the prepared forward).
        with accelerator.autocast():
            result = validate(unwrapped, val_pack, eval_batch, spec.eval.max_batches, device, rank, world, reduce_sum)
        loss, stopping = result["loss"], spec.eval.early_stopping
        finite = math.isfinite(loss)
        # As in the Hugging Face Trainer: patience restarts only on a drop of more than min_delta below the best,
        # while any drop makes a new best.
        stale_evals = 0 if finite and (best_loss is None or loss < best_loss - stopping.min_delta) else stale_evals + 1
        improved = finite and (best_loss is None or loss < best_loss)
        if improved:
            best_loss, best_step = loss, at_step
        if is_main:
            with accelerator.autocast():
                samples = generate_samples(unwrapped, tokenizer, prompts, spec.eval.max_new_tokens,
                                           spec.eval.temperature, spec.eval.top_p, spec.run.seed, at_step, device)
            now = time.time()
            for sample in samples:
                records.sample({"step": at_step, "time": now, **sample})
            rate, checked = syntax_rate(samples)
            record = {"step": at_step, "time": now, "split": "val", **result, "syntax_rate": rate, "syntax_samples": checked,
                      "stale_evals": stale_evals}
            if improved:
                model.save_adapter(unwrapped, tokenizer, run_dir / "best", info={"best.json": {
                    "step": at_step, "val_loss": loss, "perplexity": result["perplexity"], "syntax_rate": rate,
                    "syntax_samples": checked, "time": now}})
            record["seconds"] = round(time.perf_counter() - begin, 4)
            records.metric(record)
            state.best_val_loss, state.best_step = best_loss, best_step
            logger.info("validation", step=at_step, loss=round(loss, 4), perplexity=round(result["perplexity"], 2),
                        syntax_rate=None if rate is None else round(rate, 3), samples=checked, best_step=best_step,
                        stale_evals=stale_evals, seconds=record["seconds"])
        return stopping.patience is not None and stale_evals >= stopping.patience

    def save(at_step: int, micro_in_step: int = 0, loss_so_far: float = 0.0) -> None:
        """A checkpoint after step at_step, plus micro_in_step micro-batches whose gradients are kept."""
        nonlocal last_save
        begin = time.perf_counter()
        if is_main:
            track.heartbeat(run_dir, at_step, "checkpointing")
        rng_states = gather_object([checkpoint.capture_rng()])
        grads = {n: p.grad.detach().cpu().clone() for n, p in trainable.items() if micro_in_step and p.grad is not None}
        all_grads = gather_object([grads])
        if is_main:
            folder = checkpoint.save_checkpoint(run_dir, checkpoint.Checkpoint(
                step=at_step,
                trainable={n: p.detach().cpu().contiguous() for n, p in trainable.items()},
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                progress={
                    "step": at_step,
                    "micro_in_step": micro_in_step,
                    "partial_loss": loss_so_far,
                    "micro_step": micro_index(at_step) + micro_in_step,
                    "epoch": (micro_index(at_step) + micro_in_step) // order.micro_steps_per_epoch,
                    "cursor": (micro_index(at_step) + micro_in_step) % order.micro_steps_per_epoch,
                    "skips": skips,
                    "lr_scale": lr_scale,
                    "bad_streak": bad_streak,
                    "best_val_loss": best_loss,
                    "best_step": best_step,
                    "stale_evals": stale_evals,
                    "processes": world,
                    "threads": torch.get_num_threads(),
                    "speed": dict(speed),
                },
                rng=rng_states,
                grads=all_grads,
            ), spec.checkpoint.keep_last)
            records.event("checkpoint", step=at_step, micro_in_step=micro_in_step, path=str(folder.relative_to(run_dir)),
                        seconds=round(time.perf_counter() - begin, 4), bytes=sum(f.stat().st_size for f in folder.iterdir()))
        accelerator.wait_for_everyone()
        last_save = time.monotonic()

    def stop_requested() -> bool:
        if world == 1:
            return stop.signum is not None
        flag = torch.tensor(float(stop.signum is not None), device=device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    if is_main:
        records.event("resume" if resumed_from else "start", step=step, micro_in_step=first_micro,
                    checkpoint=str(resumed_from.relative_to(run_dir)) if resumed_from else None, processes=world,
                    micro_batch=-(-spec.train.micro_batch_size // state.micro_batch_splits))
        state.status, state.step, state.start_step, state.total_steps = "running", step, step, total_steps
        checkpoint.write_state(run_dir, state)
        track.write_config(run_dir, given, spec, plan, manifest, train_pack, val_pack, total_steps, world, cached)
        if given.has_auto:
            for reason in plan.reasons:
                logger.info("plan", reason=reason)
        logger.info("training", run=str(run_dir), steps=total_steps, from_step=step, train_sequences=len(train_pack),
                    val_sequences=len(val_pack), processes=world, precision=precision, compile=speed["compile"],
                    attention=getattr(accelerator.unwrap_model(peft_model).config, "_attn_implementation", None),
                    threads=torch.get_num_threads(),
                    context=spec.data.context_length, micro_batch=spec.train.micro_batch_size, grad_accum=spec.train.grad_accum,
                    quantization=spec.quantization.mode, gradient_checkpointing=spec.train.gradient_checkpointing)
    if is_main:
        records.start_trackers(spec)

    # Drawing the plots and the report takes over a second (matplotlib's import, then the figures): after an
    # evaluation at most once every log.plots_every_minutes, counted from the start, so that a start's first
    # step never waits for them; always once at the end.
    last_plots = time.monotonic()

    def refresh_plots() -> None:
        nonlocal last_plots
        if is_main and cadence.draws_plots(time.monotonic() - last_plots, spec):
            report.refresh(run_dir)
            last_plots = time.monotonic()

    if step == 0 and first_micro == 0:
        evaluate_now(0)
    peft_model.train()
    # The training forward (and backward): compiled when the plan says so; evaluation and sampling stay eager.
    forward_model = model.compile_for_training(peft_model, spec) if speed["compile"] else peft_model
    # Fused AdamW skips a non-finite step on the device (found_inf), so no step waits for its loss to reach the host.
    skips_on_device = model.skips_on_device(optimizer)
    scaler = accelerator.scaler  # fp16 only; its private _get_scale_async reads the loss scale without waiting
    no_scale = torch.full((), float("nan"), device=device)  # a pending step's loss scale without a scaler
    pin = device.type == "cuda"  # pinned host memory makes the copy asynchronous

    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory().to(device, non_blocking=True) if pin else tensor.to(device)

    progress_bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (is_main and sys.stderr.isatty()), dynamic_ncols=True)
    window_tokens, window_loss, window_time = 0, 0.0, 0.0
    pending: list[PendingStep] = []  # steps whose loss, gradient norm and loss scale are still on the device

    poisoned = set(spec.debug.nonfinite_micro_batches)
    overflowing = set(spec.debug.overflow_micro_batches)
    out_of_memory_once = set(spec.debug.out_of_memory_steps)
    # After an out-of-memory error each micro-batch runs in this many parts: the same sequences in every optimizer
    # step, so the effective batch, the schedule and the step count stay as planned. It lasts across restarts.
    splits = broadcast_object_list([state.micro_batch_splits if is_main else 1])[0]

    def accumulate(micro_first: int, step_tokens: int, begin: int, loss_so_far: float) -> tuple[torch.Tensor, int | None]:
        """Forward and backward over this step's micro-batches from the begin-th: the summed loss, and how many
        micro-batches were done when a signal stopped the step (None: it ran to the end)."""
        if step in out_of_memory_once:
            out_of_memory_once.discard(step)
            raise torch.OutOfMemoryError(f"debug.out_of_memory_steps: step {step} runs out of memory once")
        step_loss = torch.tensor(loss_so_far, dtype=torch.float64, device=device)
        for k in range(begin, spec.train.grad_accum):
            idx = order.indices(micro_first + k, rank)
            parts = idx.split(-(-len(idx) // splits))
            for part_index, part in enumerate(parts):
                inputs = to_device(train_pack.input_ids[part])
                positions = to_device(train_pack.position_ids[part])
                labels = to_device(train_pack.labels[part])
                last = k == spec.train.grad_accum - 1 and part_index == len(parts) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(peft_model):
                    total, _ = loss_sum(forward_model, inputs, positions, labels, fused=spec.train.liger)
                    if micro_first + k in poisoned:
                        total = total * float("nan")
                    # DDP averages gradients over processes; scaling by world makes the result the global token mean.
                    accelerator.backward(total * world / max(step_tokens, 1))
                step_loss += total.detach().double()
            if micro_first + k in overflowing:
                with torch.no_grad():
                    next(iter(trainable.values())).grad.view(-1)[0] = float("inf")
            if k < spec.train.grad_accum - 1 and stop_requested():
                return step_loss, k + 1
        return step_loss, None

    def settle() -> bool:
        """Bring the pending steps' figures to the host (one wait for the device), log them and act on non-finite
        losses, in step order; True when a streak of them rolled the run back to a checkpoint."""
        nonlocal pending, window_tokens, window_loss, window_time, bad_streak, lr_scale, skips
        if not pending:
            return False
        waited = time.perf_counter()
        figures = torch.stack([torch.stack([p.loss, p.grad_norm.double(), p.loss_scale.double()])
                               for p in pending]).tolist()
        pending[-1].seconds += time.perf_counter() - waited  # the device's time that the launches did not show
        done, pending = pending, []
        for entry, (step_loss, grad_norm, loss_scale) in zip(done, figures):
            at = entry.index + 1
            taken = math.isfinite(step_loss) and math.isfinite(grad_norm)
            # fp16 gradients overflow now and then by design: the scaler skips the step and lowers the loss scale,
            # so such a step is counted but never starts a rollback. A non-finite loss, or non-finite gradients
            # without a scaler, are bad steps.
            overflow = not taken and math.isfinite(step_loss) and scaler is not None
            skipped = None if taken else "gradient overflow" if overflow else (
                "non-finite loss" if not math.isfinite(step_loss) else "non-finite gradient")
            if taken:
                window_loss += step_loss
                window_tokens += entry.tokens
                bad_streak = [0, 0]
            elif not overflow:
                bad_streak = [bad_streak[0] if bad_streak[1] else entry.index, bad_streak[1] + 1]
            window_time += entry.seconds
            logged = cadence.logs(at, spec, total_steps) or not taken
            if is_main and logged:
                record = {
                    "step": at,
                    "time": entry.time,
                    "split": "train",
                    "epoch": round(micro_index(at) / order.micro_steps_per_epoch, 4),
                    "loss": window_loss / window_tokens if window_tokens else None,
                    "lr": entry.rates,
                    "grad_norm": grad_norm if taken else None,
                    "tokens": window_tokens,
                    "tokens_per_s": window_tokens / window_time if window_time > 0 else None,
                    "peak_memory_bytes": hardware.peak_memory_bytes(device),
                }
                if scaler is not None:
                    record["loss_scale"] = loss_scale
                if skipped:
                    record["skipped"] = skipped
                records.metric(record)
                if record["loss"] is not None:
                    progress_bar.set_postfix(loss=f"{record['loss']:.3f}")
            if logged:
                window_tokens, window_loss, window_time = 0, 0.0, 0.0
            if taken:
                continue
            if overflow:
                if is_main:
                    state.overflow_steps += 1
                    records.event("gradient_overflow", step=at, loss_scale=loss_scale)
                    logger.info("fp16 gradients overflowed: step skipped, loss scale lowered", step=at,
                                loss_scale=loss_scale)
                continue
            if is_main:
                state.bad_steps += 1
                records.event("nonfinite_loss", step=at, in_a_row=bad_streak[1], problem=skipped)
                logger.warning(f"{skipped}, step skipped", step=at, in_a_row=bad_streak[1])
            if bad_streak[1] >= spec.train.max_bad_steps:
                rollbacks = broadcast_object_list([state.rollbacks if is_main else 0])[0]
                if rollbacks >= spec.train.max_rollbacks:
                    raise RuntimeError(f"non-finite loss or gradients in {bad_streak[1]} steps in a row after {rollbacks} "
                                       "rollbacks (train.max_rollbacks); lower optim.lr or check the data")
                first_bad, count = bad_streak
                folder = newest_checkpoint()
                if folder is not None:
                    restore(folder)  # the steps still pending after this one are replayed from the checkpoint
                    # Steps replayed from the checkpoint read past the bad batches (without one, they are consumed).
                    skips = skips + [[first_bad, count * spec.train.grad_accum]]
                    progress_bar.n = step
                lr_scale *= spec.train.rollback_lr_factor
                bad_streak = [0, 0]
                scale_rates()
                if is_main:
                    state.rollbacks += 1
                    records.event("rollback", to_step=step, checkpoint=folder.name if folder else None,
                                skipped_micro_batches=count * spec.train.grad_accum, lr_scale=lr_scale)
                    logger.warning("rolled back", to_step=step, lr_scale=lr_scale)
                return True
        return False

    while step < total_steps:
        tick = time.perf_counter()
        micro_first = micro_index(step)
        batches = [order.indices(micro_first + k, r) for k in range(spec.train.grad_accum) for r in range(world)]
        # Normalise by the target tokens of the whole optimizer step on all processes: every token weighs the same.
        step_tokens = int(sum(useful_per_sequence[idx].sum() for idx in batches))
        # What a retry (after running out of memory, or a compile failure) starts again from; one process only.
        retry_from = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                      {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}) if world == 1 else None
        while True:
            try:
                step_loss, stopped_after = accumulate(micro_first, step_tokens, first_micro, partial_loss)
                break
            except Exception as err:  # noqa: BLE001 - anything but these two is raised again at once
                compile_failed = forward_model is not peft_model and not _out_of_memory(err)
                if retry_from is None or not (compile_failed or _out_of_memory(err)):
                    raise
                # Two lines: a compile error's first only names the backend, its second says what went wrong.
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                error = f"{type(err).__name__}: {' '.join(lines[:2])}"[:400]
            # Outside the except block, so the failed attempt's tensors (held by the traceback) are already freed.
            if compile_failed:
                logger.warning("torch.compile failed: training eagerly from here on", step=step, error=error)
                forward_model, speed["compile"], plan.compile = peft_model, False, False
                if is_main:
                    records.event("compile_failed", step=step, error=error)
                    # Later starts read the plan: they train eagerly too, as this run now does.
                    track.write_config(run_dir, given, spec, plan, manifest, train_pack, val_pack, total_steps, world, cached)
            else:
                splits = _retry_smaller(spec, run_dir, state, step, splits, error, is_main)
            optimizer.zero_grad(set_to_none=True)
            rng, cuda_rng, grads = retry_from
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
                torch.cuda.empty_cache()
            for name, grad in grads.items():
                trainable[name].grad = grad.clone()
        if stopped_after is not None:
            if settle():
                continue  # rolled back: the stop is taken at the next chance
            # Mid-accumulation: the gradients so far go into the checkpoint instead of being thrown away.
            save(step, stopped_after, step_loss.item())
            return _stopped(run_dir, state, stop, step, is_main)
        first_micro, partial_loss = 0, 0.0
        if world > 1:
            step_loss = reduce_sum(step_loss)
        rates = model.group_rates(optimizer)
        # Under fp16 this unscales the gradients first: the norm is of the true gradients, not finite if they overflowed.
        max_norm = spec.optim.max_grad_norm or float("inf")
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(trainable_params, max_norm))
        loss_scale = scaler._get_scale_async().clone() if scaler is not None else no_scale
        finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
        if scaler is not None:
            optimizer.step()  # the scaler skips a step whose gradients are not finite, and lowers the loss scale
        elif skips_on_device:
            # A non-finite step leaves weights and optimizer state untouched, as if it had not been taken.
            getattr(optimizer, "optimizer", optimizer).found_inf = (~finite).float()
            optimizer.step()
        elif finite.item():
            optimizer.step()
        scheduler.step()
        scale_rates()
        optimizer.zero_grad(set_to_none=True)
        pending.append(PendingStep(step, step_loss, grad_norm, loss_scale, step_tokens, rates,
                                   time.perf_counter() - tick, time.time()))
        step += 1
        progress_bar.update(1)

        evaluated = cadence.evaluates(step, spec, total_steps)
        if (cadence.logs(step, spec, total_steps) or evaluated or not skips_on_device) and settle():
            continue
        ended_early = False
        if evaluated:
            ended_early = evaluate_now(step) and step < total_steps
        if is_main:
            state.step, state.epoch = step, round(micro_index(step) / order.micro_steps_per_epoch, 4)
            state.early_stopped = ended_early
            checkpoint.write_state(run_dir, state)
            track.heartbeat(run_dir, step, "training")
        if evaluated and step < total_steps and not ended_early:
            refresh_plots()  # the final ones are written once the adapter is
        if ended_early:
            if is_main:
                records.event("early_stop", step=step, best_step=best_step, best_val_loss=best_loss,
                            patience=spec.eval.early_stopping.patience, min_delta=spec.eval.early_stopping.min_delta)
                logger.info("early stop: validation loss stopped improving", step=step, best_step=best_step,
                            best_val_loss=round(best_loss, 4) if best_loss is not None else None)
            break
        if step < total_steps:
            stopping = stop_requested()
            overdue = cadence.save_overdue(time.monotonic() - last_save, spec)
            overdue = bool(broadcast_object_list([overdue])[0]) if world > 1 else overdue
            if stopping or cadence.saves_at(step, spec) or overdue:
                if settle():
                    continue
                save(step)
            if stopping:
                return _stopped(run_dir, state, stop, step, is_main)
    progress_bar.close()

    if is_main:
        model.save_adapter(accelerator.unwrap_model(peft_model), tokenizer, run_dir / "adapter")
        report.refresh(run_dir)
        records.close()
        state.status = "completed"
        checkpoint.write_state(run_dir, state)
        records.event("complete", step=step, best_val_loss=state.best_val_loss, best_step=state.best_step,
                    early_stopped=state.early_stopped, seconds=round(time.time() - started, 1))
        logger.info("complete", run=str(run_dir), step=step, best_val_loss=state.best_val_loss, adapter=str(run_dir / "adapter"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return EXIT_OK


def _retry_smaller(spec: JobSpec, run_dir: Path, state, step: int, splits: int, error: str, is_main: bool) -> int:
    """Halve the micro-batch (and double the accumulation) after running out of memory, or say what would fit.

    One process only: with several, the others would wait for the failed one's gradients forever, so there an
    out-of-memory error fails the start like any other error."""
    micro_batch = spec.train.micro_batch_size
    if splits >= micro_batch:
        suggestion = _what_would_fit(spec)
        message = (f"train.micro_batch_size: out of memory at step {step} with 1 sequence of {spec.data.context_length} "
                   f"tokens a forward pass ({error}); {suggestion}")
        if is_main:
            state.status = "failed"
            state.errors = (state.errors + [message])[-10:]
            checkpoint.write_state(run_dir, state)
            track.event(run_dir, "error", error=message, step=step)
        raise SpecError([message])
    splits *= 2
    per_forward = -(-micro_batch // splits)
    log.get().warning("out of memory: retrying the step with a smaller micro-batch", step=step, micro_batch=per_forward,
                      grad_accum=spec.train.grad_accum * splits, error=error)
    if is_main:
        state.micro_batch_splits = splits
        checkpoint.write_state(run_dir, state)
        track.event(run_dir, "out_of_memory", step=step, micro_batch=per_forward, grad_accum=spec.train.grad_accum * splits,
                    error=error)
    return splits


def _what_would_fit(spec: JobSpec) -> str:
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
    advice = [f"data.context_length: {plan.context_length}" if plan.context_length != spec.data.context_length else None,
              f"quantization.mode: {plan.quantization}" if plan.quantization != spec.quantization.mode else None,
              "train.gradient_checkpointing: true" if plan.gradient_checkpointing and not spec.train.gradient_checkpointing else None]
    advice = [a for a in advice if a]
    if not advice:
        return "the memory estimate says it should fit: lower train.memory_fraction, or free the device's memory"
    return f"by the memory estimate this would fit: {', '.join(advice)} (job plan shows the estimate)"


def _stopped(run_dir: Path, state, stop: StopSignal, step: int, is_main: bool) -> int:
    if is_main:
        state.status = "stopped"
        checkpoint.write_state(run_dir, state)
        name = signal.Signals(stop.signum).name if stop.signum else "signal"
        track.event(run_dir, "stopped", signal=name, step=step)
        log.get().info("stopped after a checkpoint", signal=name, step=step, exit_code=EXIT_STOPPED)
    return EXIT_STOPPED
