"""One start of a run: what it builds once (the Session), and moving the training state between it and a checkpoint."""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm import tqdm

from job import checkpoint, data, hardware, log, model, rundir, sharding, track
from job.checkpoint import TrainingState
from job.evaluate import (
    InfillTask,
    LineTask,
    Prompt,
    choose_infills,
    choose_next_lines,
    choose_prompts,
    prompt_context,
)
from job.spec import JobSpec, SpecError


class StopSignal:
    """Owns the SIGTERM/SIGINT handlers: the first signal asks the loop to checkpoint and stop, a second SIGINT
    aborts."""

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


@dataclass
class Faults:
    """debug.*: the failures a spec injects to test recovery (the out-of-memory ones happen once a start)."""

    nonfinite_micro_batches: set[int]
    overflow_micro_batches: set[int]
    out_of_memory_steps: set[int]


@dataclass
class Session:
    """What a start builds once and every step, evaluation and checkpoint uses; the main process alone has records."""

    given: JobSpec  # as submitted, auto fields kept (config.json records it)
    spec: JobSpec  # the plan's choices in place of every auto
    plan: hardware.Plan
    run_dir: Path
    accelerator: Accelerator
    run_state: rundir.RunState  # state.json, written by the main process
    records: track.RunRecords | None
    stop: StopSignal
    tokenizer: object
    split: data.Split
    manifest: dict
    train_pack: data.Packed
    val_pack: data.Packed
    tokenized_from_cache: bool
    prompts: list[Prompt]  # chosen once a start (main process): every evaluation completes the same ones
    line_tasks: list[LineTask]  # the same for next-line completion
    infill_tasks: list[InfillTask]  # and for fill-in-the-middle, in a run that trains it
    fim: data.Fim | None
    headers: data.FileHeaders | None
    fim_source: data.FimSource | None  # what makes the FIM examples of a training micro-batch
    model: torch.nn.Module  # the adapter on the frozen base, prepared by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: dict[str, torch.nn.Parameter]
    order: data.DataOrder
    total_steps: int
    speed: dict  # how this start would compute steps: mixed_precision, compile, liger (a resume keeps the run's)
    faults: Faults
    progress_bar: tqdm
    forward_model: torch.nn.Module | None = None  # the training forward: compiled, or the model itself
    skips_on_device: bool = False  # fused AdamW: a non-finite step is skipped without the host deciding
    splits: int = 1  # parts each micro-batch runs in since an out-of-memory retry (1: as planned)
    useful_per_sequence: torch.Tensor = field(init=False)  # target tokens of each training sequence

    def __post_init__(self):
        self.useful_per_sequence = (self.train_pack.labels[:, 1:] != data.IGNORE_INDEX).sum(dim=1)

    @property
    def sharded(self) -> bool:
        """train.fsdp: every process holds a shard of the model, so each forward pass is one of all of them."""
        return self.spec.train.fsdp

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def batches_per_step(self) -> int:
        """Micro-batches an optimizer step reads, over all processes: the same on any number of processes."""
        return self.spec.train.grad_accum * self.world

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def prepare_tokenizer(spec: JobSpec, folder: Path) -> tuple[object, data.Fim | None, data.FileHeaders | None]:
    """The run's tokenizer, with the FIM tokens it adds, its FIM setting and its file headers."""
    tokenizer = model.load_tokenizer(folder, spec.model.trust_remote_code)
    fim = data.resolve_fim(spec.data.fim, tokenizer)
    if fim is not None and fim.added:
        for field_name, on in (("train.fsdp", spec.train.fsdp), ("train.liger", spec.train.liger)):
            if on:
                raise SpecError([f"data.fim.add_tokens: the added FIM tokens' rows cannot be trained under {field_name}"
                                 " (set data.fim.tokens to tokens the tokenizer has, or data.fim.rate to 0)"])
    return tokenizer, fim, data.file_headers(spec.data, tokenizer)


def prepare_inputs(spec: JobSpec, run_dir: Path, accelerator: Accelerator):
    """Data split, tokenizer, base model folder and packed tensors; the main process writes, the others read."""
    source = model.model_source(spec, run_dir)
    problems: list[str] = []
    if accelerator.is_main_process:
        try:
            split, manifest = data.build_split(spec.data, spec.run.seed, run_dir / "data",
                                               leave_out=[spec.run.output_dir])
            if source.builtin and not (source.folder / "config.json").is_file():
                model.create_tiny_model(spec, source.folder, [f.text for f in split.train])
            if source.gguf is not None and not (source.folder / "config.json").is_file():
                model.convert_gguf(source.gguf, source.folder)
            model.check_model_folder(source.folder, spec.model.trust_remote_code)
            tokenizer, fim, headers = prepare_tokenizer(spec, source.folder)
            train_pack, val_pack, cached = data.packed_data(split, manifest, tokenizer, spec.data.context_length,
                                                            run_dir / "data" / "cache", headers, spec.data.packing)
        except SpecError as err:
            problems = err.problems
    problems = broadcast_object_list([problems])[0]
    if problems:
        raise SpecError(problems)
    if not accelerator.is_main_process:
        split, manifest = data.build_split(spec.data, spec.run.seed, run_dir / "data")
        tokenizer, fim, headers = prepare_tokenizer(spec, source.folder)
        train_pack, val_pack, cached = data.packed_data(split, manifest, tokenizer, spec.data.context_length,
                                                        run_dir / "data" / "cache", headers, spec.data.packing)
    if fim is not None and train_pack.pieces is None:
        raise SpecError(["data.fim: the tokenizer gives no character offsets, which FIM needs"])
    return source, split, manifest, tokenizer, fim, headers, train_pack, val_pack, cached


def start(given: JobSpec, spec: JobSpec, plan: hardware.Plan, submitted_spec: str, accelerator: Accelerator,
          run_dir: Path, run_state: rundir.RunState, stop: StopSignal, records: track.RunRecords | None) -> Session:
    """Read the data, build the model, its optimizer and schedule, and prepare them with accelerate."""
    precision, is_main = accelerator.mixed_precision, accelerator.is_main_process
    set_seed(spec.run.seed)
    if is_main:
        rundir.heartbeat(run_dir, run_state.step, "preparing")
    source, split, manifest, tokenizer, fim, headers, train_pack, val_pack, cached = prepare_inputs(
        spec, run_dir, accelerator)
    if is_main and not (run_dir / "job.yaml").exists():
        (run_dir / "job.yaml").write_text(submitted_spec)
    if is_main:
        for folder in (run_dir / "adapter", run_dir / "best"):
            model.finish_interrupted_swap(folder)
    # Sharded, every process generates alongside the main one: its forward passes gather the weights from all.
    generates = is_main or spec.train.fsdp
    context = prompt_context(spec.data.context_length, tokenizer, split.val, headers)
    prompts = choose_prompts(split.val, spec.eval.samples, spec.run.seed, tokenizer, context,
                             spec.eval.max_new_tokens) if generates else []
    line_tasks = choose_next_lines(split.val, spec.eval.next_lines, spec.run.seed, tokenizer, context,
                                   spec.eval.next_line_max_tokens) if generates else []
    infill_tasks = choose_infills(split.val, spec.eval.infills, spec.run.seed, tokenizer, context,
                                  spec.eval.next_line_max_tokens) if generates and fim is not None else []
    added_tokens = list(fim.ids) if fim is not None and fim.added else []
    peft_model = model.build(source.folder, spec, hardware.base_dtype(precision), accelerator.device, added_tokens)
    if spec.train.fsdp:
        sharding.shard(peft_model)
    optimizer = model.make_optimizer(peft_model, spec)
    order = data.DataOrder(spec.run.seed, len(train_pack), spec.train.micro_batch_size)
    # A run's step count is that of its first start (the schedule was laid out for it), however it is resumed.
    recorded_steps = broadcast_object_list([run_state.total_steps if is_main else 0])[0]
    total_steps = recorded_steps or total_optimizer_steps(spec, plan, len(train_pack))
    if plan.compile is None:  # train.epochs: the step count was not known when the plan was made
        plan.compile, why = hardware.compile_choice(spec, precision, accelerator.device.type, total_steps)
        plan.reasons.append(why)
    scheduler = model.make_scheduler(optimizer, spec, total_steps)
    # Dropout differs between processes; every other random choice is made from the seed alone.
    torch.manual_seed(spec.run.seed + accelerator.process_index)
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    if spec.train.fsdp:
        optimizer = accelerator.prepare(optimizer)  # the model is sharded already: no DDP wrapper around it
    else:
        peft_model, optimizer = accelerator.prepare(peft_model, optimizer)
    splits = broadcast_object_list([run_state.micro_batch_splits if is_main else 1])[0]
    return Session(
        given=given, spec=spec, plan=plan, run_dir=run_dir, accelerator=accelerator, run_state=run_state,
        records=records, stop=stop, tokenizer=tokenizer, split=split, manifest=manifest, train_pack=train_pack,
        val_pack=val_pack, tokenized_from_cache=cached, prompts=prompts, line_tasks=line_tasks,
        infill_tasks=infill_tasks, fim=fim, headers=headers,
        fim_source=data.FimSource.of(fim, data.pack_documents(split.train, headers, spec.data.packing), train_pack,
                                     tokenizer, spec.run.seed) if fim else None,
        model=peft_model,
        optimizer=optimizer,
        scheduler=scheduler, trainable=trainable, order=order, total_steps=total_steps,
        speed={"mixed_precision": precision, "compile": plan.compile, "liger": spec.train.liger},
        faults=Faults(set(spec.debug.nonfinite_micro_batches), set(spec.debug.overflow_micro_batches),
                      set(spec.debug.out_of_memory_steps)),
        progress_bar=tqdm(total=total_steps, unit="step", disable=not (is_main and sys.stderr.isatty()),
                          dynamic_ncols=True),
        skips_on_device=model.skips_on_device(optimizer),
        splits=splits,
    )


def total_optimizer_steps(spec: JobSpec, plan: hardware.Plan, sequences: int) -> int:
    limits = []
    if spec.train.max_steps is not None:
        limits.append(spec.train.max_steps)
    if spec.train.epochs is not None:
        limits.append(max(1, math.ceil(spec.train.epochs * sequences / plan.sequences_per_step)))
    return min(limits)


def read_batch(session: Session, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, position ids and labels of micro-batch `batch` (counted over all processes), with the FIM
    examples a run that trains them makes."""
    pack, sequences = session.train_pack, session.order.indices(batch)
    if session.fim_source is None:
        return pack.input_ids[sequences], pack.position_ids[sequences], pack.labels[sequences]
    pad = session.tokenizer.pad_token_id
    return session.fim_source.batch(pack, sequences, session.order.epochs(batch),
                                    pad if pad is not None else session.tokenizer.eos_token_id)


def fresh_state(session: Session) -> TrainingState:
    """The state of a run's first step."""
    return TrainingState(processes=session.world, threads=torch.get_num_threads(), speed=dict(session.speed))


def newest_checkpoint(session: Session) -> Path | None:
    """The newest checkpoint that verifies (the main process looks; every process gets its answer)."""
    def rejected(folder: Path, aside: Path, problem: str) -> None:
        log.get().warning("checkpoint rejected", checkpoint=folder.name, problem=problem, moved_to=aside.name)
        session.records.event("checkpoint_rejected", checkpoint=folder.name, problem=problem, moved_to=aside.name)

    found = checkpoint.newest_good_checkpoint(session.run_dir, rejected) if session.is_main else None
    return broadcast_object_list([found])[0]


def load_trainable(trainable: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                   grads: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's weights and partial gradients (kept on the host, whole) into the parameters, on their
    devices and in their shards."""
    with torch.no_grad():
        for name, tensor in weights.items():
            param = trainable[name]
            sharding.local(param).copy_(sharding.local(sharding.like(param, tensor)))
            # A parameter's gradient must live on its device: assigning a host tensor to a GPU parameter fails.
            param.grad = sharding.like(param, grads[name]) if name in grads else None


def restore(session: Session, folder: Path) -> TrainingState:
    """Load a checkpoint into the model, optimizer, schedule, scaler and random state; return its training state."""
    saved = checkpoint.load_checkpoint(folder)
    state = TrainingState.from_progress(saved.progress)
    before = state.speed or session.speed
    for name in ("mixed_precision", "liger"):
        if before[name] != session.speed[name]:
            raise SpecError([f"train.{name}: {folder.name} was trained with {before[name]}, this start would use "
                             f"{session.speed[name]}, which would change the run's result; start a new run with a "
                             "new run.name"])
    changed = state.processes != session.world
    if changed:
        redone = carry_over_processes(session, state, folder)
    elif len(state.partial_losses) == session.world:
        state.partial_loss = state.partial_losses[session.rank]  # each process's own share of the step's loss
    # Sharded, the partial gradients were reduced over the processes already, and saved whole, once.
    grads = {} if changed else saved.grads[0 if session.sharded else session.rank]
    load_trainable(session.trainable, saved.trainable, grads)
    if session.sharded:
        sharding.load_optimizer_state(session.optimizer.optimizer, saved.optimizer)
    else:
        session.optimizer.load_state_dict(saved.optimizer)
    session.scheduler.load_state_dict(saved.scheduler)
    if session.accelerator.scaler is not None and saved.scaler is not None:
        # fp16's loss scale: a resume that started again from the initial scale would skip other steps.
        session.accelerator.scaler.load_state_dict(saved.scaler)
    if session.rank < len(saved.rng):
        checkpoint.restore_rng(saved.rng[session.rank])
    else:
        # A process the checkpoint did not have: its own dropout stream, from the seed, the step and its rank.
        checkpoint.restore_rng(saved.rng[0])
        torch.manual_seed(session.spec.run.seed * 1_000_003 + state.step * 1_009 + session.rank)
    # A start that fell back to eager after a compile failure left the rest of the run eager too.
    state.speed = {**session.speed, "compile": before["compile"]}
    if session.device.type == "cpu" and not changed:
        torch.set_num_threads(state.threads)  # another thread count changes float sums, and so the result
    else:
        state.threads = torch.get_num_threads()
    if session.is_main:
        # Records written after this checkpoint are superseded by the ones written again from it.
        session.records.rewind(state.step)
        if changed:
            session.records.event("processes_changed", step=state.step, checkpoint=folder.name,
                                  from_processes=state.processes, processes=session.world,
                                  from_grad_accum=session.batches_per_step // state.processes,
                                  grad_accum=session.spec.train.grad_accum, redone_micro_batches=redone)
    state.processes = session.world
    session.progress_bar.n = state.step
    return state


def carry_over_processes(session: Session, state: TrainingState, folder: Path) -> int:
    """Go on from a checkpoint written by another number of processes: the data order is one stream over all of them
    and the global batch stays, so only a step stopped inside is done again, from its first micro-batch (its
    gradients were summed per process). Returns the micro-batches done again."""
    redone = state.micro_in_step * state.processes
    log.get().warning("resuming with another number of processes: the result will differ from an uninterrupted run "
                      "in float rounding and dropout, not in the data it reads", checkpoint=folder.name,
                      from_processes=state.processes, processes=session.world,
                      grad_accum=session.spec.train.grad_accum, redone_micro_batches=redone)
    state.micro_in_step, state.partial_loss = 0, 0.0
    return redone


def save(session: Session, state: TrainingState) -> None:
    """A checkpoint of the state: after state.step steps, plus state.micro_in_step micro-batches whose gradients are
    kept."""
    begin = time.perf_counter()
    run_dir, is_main = session.run_dir, session.is_main
    if is_main:
        rundir.heartbeat(run_dir, state.step, "checkpointing")
    rng_states = gather_object([checkpoint.capture_rng()])
    state.partial_losses = gather_object([state.partial_loss])
    # Sharded, every process takes part in gathering each tensor whole; the main process keeps the result.
    trainable = {n: sharding.whole(p.detach()).cpu().contiguous() for n, p in session.trainable.items()}
    grads = {n: sharding.whole(p.grad.detach()).cpu().clone() for n, p in session.trainable.items()
             if state.micro_in_step and p.grad is not None}
    if session.sharded:
        all_grads = [grads] + [{}] * (session.world - 1)  # reduced over the processes already: one copy
        optimizer_state = sharding.optimizer_state(session.optimizer.optimizer)
    else:
        all_grads = gather_object([grads])
        optimizer_state = session.optimizer.state_dict()
    if is_main:
        scaler = session.accelerator.scaler
        folder = checkpoint.save_checkpoint(run_dir, checkpoint.Checkpoint(
            step=state.step,
            trainable=trainable,
            optimizer=optimizer_state,
            scheduler=session.scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            progress=state.to_progress(session.batches_per_step, session.order),
            rng=rng_states,
            grads=all_grads,
        ), session.spec.checkpoint.keep_last)
        session.records.event("checkpoint", step=state.step, micro_in_step=state.micro_in_step,
                              path=str(folder.relative_to(run_dir)), seconds=round(time.perf_counter() - begin, 4),
                              bytes=sum(f.stat().st_size for f in folder.iterdir()))
    session.accelerator.wait_for_everyone()


def scale_rates(session: Session, state: TrainingState) -> None:
    """Each group's scheduled rate times what rollbacks have scaled it by."""
    # Schedulers compute each rate afresh from their own state, so scaling after every step compounds nothing.
    for group, rate in zip(session.optimizer.param_groups, session.scheduler.get_last_lr()):
        group["lr"] = rate * state.lr_scale


def epoch_at(session: Session, state: TrainingState, step: int) -> float:
    """Passes over the training data after `step` steps, past any batches a rollback skipped."""
    return round(session.order.epochs_at(state.first_batch(step, session.batches_per_step)), 4)


def write_run_state(session: Session, state: TrainingState, **changes) -> None:
    """state.json (main process): where training stands, and any of its other fields given."""
    if not session.is_main:
        return
    run_state = session.run_state
    run_state.step = state.step
    run_state.epoch = epoch_at(session, state, state.step)
    run_state.best_val_loss, run_state.best_step = state.best_val_loss, state.best_step
    for name, value in changes.items():
        setattr(run_state, name, value)
    rundir.write_state(session.run_dir, run_state)


def agreed(session: Session, flag: bool) -> bool:
    """True on every process when it is true on any: all of them must take the same branch."""
    if session.world == 1:
        return flag
    value = torch.tensor(float(flag), device=session.device)
    return bool(session.accelerator.reduce(value, reduction="sum").item() > 0)


def stop_requested(session: Session) -> bool:
    return agreed(session, session.stop.signum is not None)


def main_decides(session: Session, value):
    """The main process's value on every process (a clock's verdict, say, which may differ by a hair between them)."""
    return broadcast_object_list([value])[0] if session.world > 1 else value


def write_adapter(session: Session, folder: Path, info: dict[str, dict] | None = None) -> None:
    """The adapter into folder (main process); sharded, every process must call it to gather the weights."""
    unwrapped = session.accelerator.unwrap_model(session.model)
    state_dict = sharding.adapter_state(unwrapped) if session.sharded else None
    if session.is_main:
        model.save_adapter(unwrapped, session.tokenizer, folder, info=info, state_dict=state_dict)
