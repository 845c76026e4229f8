"""What a person looks at: the plots and the one-file report, rebuilt from the run folder's files alone."""

from __future__ import annotations

import base64
import html
import json
import statistics
import time
from pathlib import Path

from job.rundir import read_jsonl
from job.runs import (
    COMPLETION_ROWS,
    RunMetrics,
    RunSummary,
    format_duration,
    held_locks,
    latest_per_step,
    summarize,
    tokens_seen,
)

PLOTS = ["loss", "lr", "grad_norm", "throughput", "memory", "syntax", "completion"]


def figure(ncols: int = 1, width: float = 8.0):
    """A figure outside pyplot's global state (safe in any thread), with its axes."""
    # matplotlib's import takes about a second: a start that trains imports it with the first plots, not before.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    # Fixed margins: tight_layout measured every label and took half of the plotting time.
    fig.subplots_adjust(left=0.9 / width, right=0.98, top=0.91, bottom=0.12, wspace=0.25)
    return fig, axes


def save_figure(fig, path: Path) -> Path:
    """Write to a temporary name and rename: a reader never sees half an image."""
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** count))
    return out


def predicted_peak(plan: dict) -> int | None:
    """The plan's predicted peak in the unit peak_memory_bytes measures: torch's allocations on a GPU, the whole
    process's resident memory (the estimate plus the process itself) on the CPU."""
    if not plan.get("predicted_peak_bytes"):
        return None
    on_gpu = (plan.get("device") or {}).get("kind") in ("cuda", "mps")
    return plan["predicted_peak_bytes"] + (0 if on_gpu else plan.get("overhead_bytes", 0))


def plan_line(plan: dict) -> str:
    if "context_length" not in plan:
        return ", ".join(f"{k}: {v}" for k, v in plan.items()) or "-"
    predicted = predicted_peak(plan) or 0
    return (f"{plan.get('total_steps')} steps of {plan['grad_accum']} x {plan['micro_batch_size']} sequences of "
            f"{plan['context_length']} tokens x {plan.get('processes', 1)} process(es); "
            f"quantization {plan['quantization']}, "
            f"gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}, mixed precision "
            f"{plan['mixed_precision']}; predicted peak {predicted / 2**30:.2f} GiB of a "
            f"{plan['budget_bytes'] / 2**30:.2f} GiB budget")


def write_plots(run_dir: Path) -> list[Path]:
    """plots/*.png from metrics.jsonl and config.json; a plot without data is not written."""
    records = latest_per_step(read_jsonl(run_dir / "metrics.jsonl"))
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    spec, plan = config.get("spec", {}), config.get("plan", {})
    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    written = []

    fig, ax = figure()
    finite = [r for r in train if r.get("loss") is not None]
    if finite:
        steps = [r["step"] for r in finite]
        ax.plot(steps, [r["loss"] for r in finite], label="train", alpha=0.3, linewidth=1, color="tab:blue")
        ax.plot(steps, smoothed([r["loss"] for r in finite]), label="train (smoothed)", linewidth=2, color="tab:blue")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], label="validation", marker="o", linewidth=2,
                color="tab:orange")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="Loss")
    ax.grid(alpha=0.3)
    if finite or val:
        ax.legend()
    written.append(save_figure(fig, folder / "loss.png"))

    if train:
        fig, ax = figure()
        groups = sorted({name for r in train for name in (r.get("lr") or {})})
        for name in groups:
            points = [(r["step"], r["lr"][name]) for r in train if name in (r.get("lr") or {})]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
        ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate per parameter group")
        if groups and all(p > 0 for r in train for p in (r.get("lr") or {}).values()):
            ax.set_yscale("log")
        if groups:
            ax.legend()
        ax.grid(alpha=0.3, which="both")
        written.append(save_figure(fig, folder / "lr.png"))

        norms = [(r["step"], r["grad_norm"]) for r in train if r.get("grad_norm") is not None]
        if norms:
            fig, ax = figure()
            ax.plot([p[0] for p in norms], [p[1] for p in norms], label="gradient norm (before clipping)", linewidth=1)
            clip = (spec.get("optim") or {}).get("max_grad_norm")
            if clip:
                ax.axhline(clip, color="tab:red", linestyle="--", linewidth=1, label=f"clipped to {clip}")
            ax.set(xlabel="optimizer step", ylabel="L2 norm of the trainable gradients", title="Gradient norm")
            if all(p[1] > 0 for p in norms):
                ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
            written.append(save_figure(fig, folder / "grad_norm.png"))

        speeds = [(r["step"], r["tokens_per_s"]) for r in train if r.get("tokens_per_s")]
        if speeds:
            fig, ax = figure()
            median = statistics.median(p[1] for p in speeds)
            ax.plot([p[0] for p in speeds], [p[1] for p in speeds], linewidth=1, label="per logging window")
            ax.axhline(median, color="tab:green", linestyle="--", linewidth=1, label=f"median {median:,.0f}")
            ax.set(xlabel="optimizer step", ylabel="target tokens per second", title="Training throughput",
                   ylim=(0, None))
            ax.grid(alpha=0.3)
            ax.legend()
            written.append(save_figure(fig, folder / "throughput.png"))

        memory = [(r["step"], r["peak_memory_bytes"] / 2**20) for r in train if r.get("peak_memory_bytes")]
        if memory:
            fig, ax = figure()
            ax.plot([p[0] for p in memory], [p[1] for p in memory], linewidth=2, label="measured")
            predicted = predicted_peak(plan)
            if predicted:
                ax.axhline(predicted / 2**20, color="tab:orange", linestyle="--", linewidth=1,
                           label=f"predicted by the plan ({predicted / 2**30:.2f} GiB)")
            ax.legend(loc="lower right")
            ax.set(xlabel="optimizer step", ylabel="MiB",
                   title="Peak memory (GPU allocated, or process resident on the CPU)", ylim=(0, None))
            ax.grid(alpha=0.3)
            written.append(save_figure(fig, folder / "memory.png"))

    rated = [r for r in val if r.get("syntax_rate") is not None]
    if rated:
        fig, ax = figure()
        ax.plot([r["step"] for r in rated], [100 * r["syntax_rate"] for r in rated], marker="o", linewidth=2)
        ax.set(xlabel="optimizer step", ylabel="samples that parse (%)", ylim=(-5, 105),
               title=f"Syntax rate of sample completions ({rated[-1]['syntax_samples']} samples an evaluation)")
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, folder / "syntax.png"))

    scored = [r for r in val if any(r.get(key) is not None for _, key, _ in COMPLETION_ROWS)]
    if scored:
        fig, ax = figure()
        for name, key, tasks in COMPLETION_ROWS:
            points = [(r["step"], r[key]) for r in scored if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", linewidth=2,
                        label=f"{name.removeprefix('final ')} ({scored[-1].get(tasks)} tasks)")
        ax.set(xlabel="optimizer step", ylabel="score (1 is the real code)", ylim=(-0.05, 1.05),
               title="Completion accuracy on the validation files")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, folder / "completion.png"))
    return written


# The report ------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 70rem; \
color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; } td, th { padding: 0.25rem 0.8rem 0.25rem 0; text-align: left; \
vertical-align: top; }
th { color: #555; font-weight: 600; } .status { font-weight: 700; padding: 0.1rem 0.5rem; border-radius: 0.3rem; \
background: #eee; }
.completed { background: #d4f4dd; } .running { background: #dbe9ff; } .stopped, .interrupted { background: #fff1c2; }
.failed, .corrupt { background: #ffd6d6; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
pre { background: #f6f8fa; padding: 0.6rem; overflow-x: auto; font-size: 0.85rem; white-space: pre-wrap; }
.completion { background: #e6ffec; } .verdict-parses { color: #1a7f37; } .verdict-syntax_error, .verdict-unfinished { \
color: #cf222e; }
.muted { color: #777; } .verdict-exact { color: #1a7f37; } .verdict-differs { color: #9a6700; }
code { background: #f6f8fa; white-space: pre-wrap; font-size: 0.85rem; }
"""


def _h(value) -> str:
    return html.escape(str(value), quote=True)


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{_h(k)}</th><td>{v}</td></tr>" for k, v in pairs)


def next_line_table(lines: list[dict]) -> tuple[str, str]:
    """The next lines the first evaluation and the latest one wrote, task by task: a heading and a table."""
    steps = sorted({line["step"] for line in lines})
    if not steps:
        return "Next lines", "<p>No next lines.</p>"
    first = {line["index"]: line for line in lines if line["step"] == steps[0]}
    latest = {line["index"]: line for line in lines if line["step"] == steps[-1]}

    def written(line: dict | None) -> str:
        if line is None:
            return "-"
        return (f"<code>{_h(line['completion'])}</code><br><span class='verdict-{_h(line['verdict'])}'>"
                f"{_h(line['verdict'])}</span> <span class='muted'>edit sim {line['edit_sim']:.2f}</span>")

    rows = "".join(
        f"<tr><td>{_h(task['path'])}</td><td><code>{_h(task['prompt'])}</code></td><td><code>{_h(task['target'])}"
        f"</code></td><td>{written(first.get(index))}</td><td>{written(latest.get(index))}</td></tr>"
        for index, task in sorted(latest.items()))
    exact = [sum(line["verdict"] == "exact" for line in side.values()) for side in (first, latest)]
    heading = f"Next lines (step {steps[0]} and step {steps[-1]})"
    table = (f"<p class='muted'>Given the file up to the line above, the model writes one line greedily at every "
             f"evaluation: exact (whitespace aside) {exact[0]} of {len(first)} at step {steps[0]}, {exact[1]} of "
             f"{len(latest)} at step {steps[-1]}.</p><table><tr><th>file</th><th>line above</th><th>real line</th>"
             f"<th>step {steps[0]}</th><th>step {steps[-1]}</th></tr>{rows}</table>")
    return heading, table


def write_report(run_dir: Path, summary: RunSummary | None = None) -> Path:
    """report.html: one self-contained page (images inline, no script, no network) from the run's files."""
    summary = summary or summarize(run_dir, held_locks())
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    records = latest_per_step(read_jsonl(run_dir / "metrics.jsonl"))
    val = [r for r in records if r.get("split") == "val"]
    samples = read_jsonl(run_dir / "samples.jsonl")
    events = read_jsonl(run_dir / "events.jsonl")
    last = val[-1] if val else {}
    best = min(val, key=lambda r: r["loss"]) if val else None
    hardware = config.get("hardware", {})
    data = config.get("data", {})

    facts = [
        ("status", f'<span class="status {_h(summary.status)}">{_h(summary.status)}</span>'
                   + (" (stopped early: validation stopped improving)" if summary.early_stopped else "")),
        ("step", f"{summary.step} of {summary.total_steps}"
                 + (f" ({100 * summary.progress:.0f}%)" if summary.progress is not None else "")),
        ("epoch", _h(summary.epoch)),
        ("best validation loss", f"{best['loss']:.4f} (perplexity {best['perplexity']:.2f}) at step {best['step']}"
                                 if best else "-"),
        ("latest validation loss", f"{last['loss']:.4f} at step {last['step']}" if last else "-"),
        ("syntax rate", f"{100 * last['syntax_rate']:.0f}% of {last['syntax_samples']} samples at step {last['step']}"
                        if last.get("syntax_rate") is not None else "-"),
        *[(name.removeprefix("final "), f"{last[key]:.3f} over {last[tasks]} tasks at step {last['step']}"
           if last.get(key) is not None else "-") for name, key, tasks in COMPLETION_ROWS],
        ("restarts", _h(summary.restarts)),
        ("errors", "<br>".join(_h(e) for e in summary.errors) or "none"),
        ("estimated time left", format_duration(summary.eta_s)),
        ("last update", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(summary.updated))
                        if summary.updated else "-"),
        ("hardware", _h(", ".join(f"{k}: {v / 2**30:.1f} GiB" if k.endswith("bytes") and isinstance(v, (int, float))
                                  else f"{k}: {v}"
                                  for k, v in hardware.items()) or "-")),
        ("versions", _h(", ".join(f"{k} {v}" for k, v in config.get("versions", {}).items() if v) or "-")),
        ("plan", _h(plan_line(config.get("plan", {})))),
        ("why", "<br>".join(_h(r) for r in config.get("plan", {}).get("reasons", [])) or "-"),
        ("data", _h(", ".join(f"{side}: {data.get('files', {}).get(side, 0):,} files, "
                              f"{data.get('target_tokens', {}).get(side, 0):,} target tokens"
                              for side in ("train", "val"))) if data else "-"),
    ]

    images = []
    for name in PLOTS:
        path = run_dir / "plots" / f"{name}.png"
        if path.is_file():
            encoded = base64.b64encode(path.read_bytes()).decode("ascii")
            images.append(f'<img alt="{_h(name)} plot" src="data:image/png;base64,{encoded}">')

    line_heading, line_table = next_line_table([s for s in samples if s.get("kind") == "next_line"])
    samples = [s for s in samples if s.get("kind") != "next_line"]
    latest_step = max((s["step"] for s in samples), default=None)
    sample_blocks = []
    for s in (s for s in samples if s["step"] == latest_step):
        sample_blocks.append(
            f"<h3>{_h(s['path'])} "
            f"<span class='muted'>({_h(s['language'])}, {_h(s['kind'])}, ended by {_h(s['ended'])})</span> "
            f"<span class='verdict-{_h(s['verdict'])}'>{_h(s['verdict'])}</span></h3>"
            + (f"<p class='muted'>{_h(s['error'])}</p>" if s.get("error") else "")
            + f"<pre>{_h(s['prompt'])}<span class='completion'>{_h(s['completion'])}</span>"
            # An infill's middle sits between its prefix and its suffix (shown plain too), the real line below.
            + (f"{_h(s['suffix'])}</pre><p class='muted'>real line: <code>{_h(s.get('target', ''))}</code>"
               # Older runs' samples have no trimmed middle.
               + (f"; trimmed as an editor shows it: <code>{_h(s['trimmed'])}</code> "
                  f"({_h(s['trimmed_verdict'])})" if "trimmed" in s else "") + "</p>"
               if s.get("kind") == "infill" else "</pre>"))

    event_rows = "".join(
        f"<tr><td>{_h(time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e.get('time', 0))))}</td>"
        f"<td>{_h(e.get('event'))}</td>"
        f"<td>{_h(', '.join(f'{k}={v}' for k, v in e.items() if k not in ('time', 'event')))}</td></tr>"
        for e in events[-30:])

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_h(summary.name)}: {_h(summary.status)}</title><style>{STYLE}</style></head>
<body>
<h1>{_h(summary.name)}</h1>
<p class="muted">{_h(run_dir)} · report written {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}</p>
<h2>Summary</h2>
<table>{_rows(facts)}</table>
<h2>Plots</h2>
{"".join(images) or "<p>No metrics yet.</p>"}
<h2>Latest samples{f" (step {latest_step})" if latest_step is not None else ""}</h2>
<p class="muted">The prompt is shown plain, the model's completion highlighted.</p>
{"".join(sample_blocks) or "<p>No samples.</p>"}
<h2>{_h(line_heading)}</h2>
{line_table}
<h2>Events (latest 30)</h2>
<table><tr><th>time (UTC)</th><th>event</th><th>details</th></tr>{event_rows}</table>
<h2>Spec (resolved)</h2>
<pre>{_h(json.dumps(config.get("spec", {}), indent=2))}</pre>
</body></html>
"""
    path = run_dir / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def refresh(run_dir: Path) -> None:
    """Plots, then the report that embeds them."""
    write_plots(run_dir)
    write_report(run_dir)


def write_compare_plot(runs: list[RunMetrics], path: Path) -> Path:
    """Validation loss of every run against optimizer steps and against training tokens seen, side by side."""
    fig, (by_step, by_tokens) = figure(ncols=2, width=13)
    for run in runs:
        val = [r for r in run.records if r.get("split") == "val"]
        seen = tokens_seen(run.records)
        steps = [r["step"] for r in val]
        by_step.plot(steps, [r["loss"] for r in val], marker="o", label=run.path.name)
        known = [r for r in val if r["step"] in seen]
        by_tokens.plot([seen[r["step"]] for r in known], [r["loss"] for r in known], marker="o", label=run.path.name)
    by_step.set(xlabel="optimizer step", ylabel="validation loss (nats per token)", title="Validation loss by step")
    by_tokens.set(xlabel="training target tokens seen", ylabel="validation loss (nats per token)",
                  title="Validation loss by tokens seen")
    for ax in (by_step, by_tokens):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)
