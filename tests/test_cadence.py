"""When the loop logs, evaluates, checkpoints and draws: the predicates, step by step."""

from job import cadence
from job.spec import build_spec


def spec(**sections):
    return build_spec({"train": {"max_steps": 10}, **sections})


def steps_where(predicate, total: int = 10) -> list[int]:
    return [step for step in range(total + 1) if predicate(step)]


def test_logging_follows_its_cadence_and_always_takes_the_last_step():
    assert steps_where(lambda s: cadence.logs(s, spec(), 10)) == list(range(11))
    every_3 = spec(log={"every_steps": 3})
    assert steps_where(lambda s: cadence.logs(s, every_3, 10)) == [0, 3, 6, 9, 10]


def test_evaluation_follows_its_cadence_and_always_takes_the_last_step():
    every_4 = spec(eval={"every_steps": 4})
    assert steps_where(lambda s: cadence.evaluates(s, every_4, 10)) == [0, 4, 8, 10]
    assert steps_where(lambda s: cadence.evaluates(s, spec(eval={"every_steps": 50}), 10)) == [0, 10]


def test_checkpoints_come_on_the_step_cadence_or_the_clock():
    every_4 = spec(checkpoint={"every_steps": 4, "every_minutes": 2.0})
    assert steps_where(lambda s: s > 0 and cadence.saves_at(s, every_4)) == [4, 8]
    assert not cadence.save_overdue(119.9, every_4) and cadence.save_overdue(120.0, every_4)
    assert not cadence.save_overdue(1e9, spec(checkpoint={"every_minutes": None}))


def test_adapters_are_kept_on_their_cadence_but_not_at_the_end():
    every_4 = spec(checkpoint={"adapter_every_steps": 4})
    assert steps_where(lambda s: cadence.keeps_adapter(s, every_4, 10)) == [4, 8]
    assert steps_where(lambda s: cadence.keeps_adapter(s, spec(checkpoint={"adapter_every_steps": 5}), 10)) == [5]
    assert steps_where(lambda s: cadence.keeps_adapter(s, spec(), 10)) == []


def test_plots_are_drawn_at_most_every_so_many_minutes():
    assert not cadence.draws_plots(59.0, spec()) and cadence.draws_plots(60.0, spec())
    assert cadence.draws_plots(0.0, spec(log={"plots_every_minutes": 0}))
