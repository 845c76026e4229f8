"""When the loop does each periodic thing, decided apart from what it does: pure predicates of the step and the clock.

Steps are counted done: step N is the moment after the N-th optimizer step (0: before the first)."""

from __future__ import annotations

from job.spec import JobSpec


def on_cadence(step: int, every: int, total: int) -> bool:
    """Every `every` steps, and at the last step whatever the cadence."""
    return step % every == 0 or step == total


def logs(step: int, spec: JobSpec, total: int) -> bool:
    """A train record goes to metrics.jsonl (a skipped step always gets one too)."""
    return on_cadence(step, spec.log.every_steps, total)


def evaluates(step: int, spec: JobSpec, total: int) -> bool:
    """Validation and samples (step 0, before training, is the loop's own first evaluation)."""
    return on_cadence(step, spec.eval.every_steps, total)


def saves_at(step: int, spec: JobSpec) -> bool:
    """A checkpoint on the step cadence; the end of the run writes the adapter instead."""
    return step % spec.checkpoint.every_steps == 0


def keeps_adapter(step: int, spec: JobSpec, total: int) -> bool:
    """A copy of the adapter in adapters/ (not at the end: adapter/ is the final one)."""
    every = spec.checkpoint.adapter_every_steps
    return every is not None and 0 < step < total and step % every == 0


def save_overdue(seconds_since_save: float, spec: JobSpec) -> bool:
    """A checkpoint on the clock: checkpoint.every_minutes since the last one."""
    minutes = spec.checkpoint.every_minutes
    return minutes is not None and seconds_since_save >= minutes * 60


def draws_plots(seconds_since_drawn: float, spec: JobSpec) -> bool:
    """plots/ and report.html after an evaluation, at most every log.plots_every_minutes."""
    return seconds_since_drawn >= spec.log.plots_every_minutes * 60
