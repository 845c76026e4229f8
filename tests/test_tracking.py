"""Reading the volume: the metrics and events schema, plots, report.html, job status / compare / report, trackers."""

import html
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job import rundir, runs, track
from job.rundir import read_jsonl

from .conftest import PROJECT, run_job, tiny_spec, write_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def valid_png(path: Path) -> bool:
    from PIL import Image

    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        return False
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        return image.size[0] > 100 and image.size[1] > 100


def test_records_round_trip_and_torn_lines_are_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "time": 1.5, "split": "train", "lr": {"lora_A": 1e-4}, "loss": 2.0},
               {"step": 2, "time": 2.5, "split": "val", "loss": float("1.25"), "syntax_rate": None}]
    for record in records:
        rundir.append_jsonl(path, record)
    assert read_jsonl(path) == records
    with path.open("a") as out:
        out.write('{"step": 3, "time": 3.5, "spl')  # a writer killed mid-line
    assert read_jsonl(path) == records
    assert runs.read_tail_jsonl(path) == records
    assert runs.read_tail_jsonl(path, max_bytes=40) == []  # only a cut line fits: nothing complete is invented
    with pytest.raises(ValueError):
        rundir.append_jsonl(path, {"loss": float("nan")})  # JSON has no NaN: the writer refuses, readers never see one


def test_readers_keep_one_record_a_step():
    """A run written before truncation on resume existed (or a crash between the two) has a step twice: the
    plots and the comparison draw it once, from the record written last."""
    records = [{"split": "train", "step": 1, "loss": 3.0}, {"split": "val", "step": 1, "loss": 2.9},
               {"split": "train", "step": 2, "loss": 2.0}, {"split": "train", "step": 2, "loss": 2.5},
               {"split": "train", "step": 3, "loss": 1.0}]
    kept = runs.latest_per_step(records)
    assert [(r["split"], r["step"], r["loss"]) for r in kept] == [("train", 1, 3.0), ("val", 1, 2.9), ("train", 2, 2.5),
                                                                  ("train", 3, 1.0)]


def test_schema_names_every_field_and_rejects_strangers():
    assert track.schema_problems({"step": 0, "time": 1.0, "split": "val", "loss": 1.0, "perplexity": 2.7, "tokens": 5,
                                  "syntax_rate": None, "syntax_samples": 0, "stale_evals": 0, "seconds": 0.1},
                                 "metrics") == []
    assert track.schema_problems({"split": "val", "step": 0, "colour": 1}, "metrics")[0] == "unknown field 'colour'"
    assert track.schema_problems({"time": 1.0, "event": "stopped", "signal": "SIGTERM", "step": 3}, "events") == []
    assert track.schema_problems({"time": 1.0, "event": "exploded"}, "events") == ["unknown event 'exploded'"]
    readme = (PROJECT / "README.md").read_text()
    for split, fields in track.METRICS_SCHEMA.items():
        for name in fields:
            assert f"| `{split}` | `{name}` |" in readme, (split, name)
    for name, fields in track.EVENTS_SCHEMA.items():
        assert f"| `{name}` |" in readme and all(f"`{field}`" in readme for field in fields), name


def write_state(run: Path, **state) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "state.json").write_text(json.dumps({"step": 5, "total_steps": 10, "updated": time.time() - 30, **state}))


def test_status_of_an_output_folder_with_runs_in_every_state(tmp_path):
    out = tmp_path / "runs"
    write_state(out / "done", status="completed", step=10, best_val_loss=1.5, best_step=8)
    write_state(out / "paused", status="stopped")
    write_state(out / "broken", status="failed", errors=["RuntimeError: boom"], restarts=2)
    write_state(out / "alive", status="running")
    write_state(out / "killed", status="running")
    (out / "killed" / ".lock").write_text("pid 1 on host gone\n")  # its holder died: nobody holds the lock
    (out / "corrupt").mkdir()
    (out / "corrupt" / "state.json").write_text('{"status": "runn')
    (out / "not-a-run").mkdir()
    for name in ("alive", "paused"):
        for step in range(1, 6):  # two seconds a step: the ETA of the 5 steps left is 10 s
            rundir.append_jsonl(out / name / "metrics.jsonl",
                                {"step": step, "time": 1000.0 + 2 * step, "split": "train"})
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"h = open({str(out / 'alive' / '.lock')!r}, 'a+')\nfcntl.flock(h, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        table = run_job("status", str(out))
        as_json = run_job("status", str(out), "--json")
    finally:
        holder.kill()
        holder.wait()
    assert table.returncode == 0 and as_json.returncode == 0, table.stderr
    found = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert {name: r["status"] for name, r in found.items()} == {
        "alive": "running", "broken": "failed", "corrupt": "corrupt", "done": "completed", "killed": "interrupted",
        "paused": "stopped"}
    assert found["alive"]["eta_s"] == pytest.approx(10.0) and found["paused"]["eta_s"] == pytest.approx(10.0)
    assert found["done"]["eta_s"] is None and found["done"]["best_val_loss"] == 1.5 and found["done"]["progress"] == 1.0
    assert found["broken"]["restarts"] == 2 and 25 < found["broken"]["age_s"] < 600
    assert "state.json cannot be read" in found["corrupt"]["problem"]
    lines = table.stdout.splitlines()
    # header, runs, corrupt's reason
    assert lines[0].split()[:3] == ["RUN", "STATUS", "PROGRESS"] and len(lines) == 1 + 6 + 1
    assert re.search(r"^done\s+completed\s+100%\s+10/10\s+1\.5000@8", table.stdout, re.M)
    # A run folder given directly is a table of one; reading never wrote anything.
    single = run_job("status", str(out / "done"))
    assert single.returncode == 0 and len(single.stdout.splitlines()) == 2
    assert sorted(p.name for p in (out / "done").iterdir()) == ["state.json"]
    missing = run_job("status", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two completed tiny runs that differ in their LoRA+ ratio; the first also reports to TensorBoard (and to a
    W&B that is not installed, which must not stop it)."""
    root = tmp_path_factory.mktemp("two-runs")
    repo = root / "repo"
    shutil.copytree(PROJECT / "job", repo / "job", ignore=shutil.ignore_patterns("__pycache__"))
    for name, ratio, trackers in [("ratio16", 16, ["tensorboard", "wandb"]), ("ratio4", 4, [])]:
        spec = tiny_spec(repo, root / "runs", run={"name": name}, lora={"plus_ratio": ratio},
                         tracking={"report_to": trackers})
        result = run_job("run", "--spec", str(write_spec(root / f"{name}.yaml", spec)))
        assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs"


pytest_slow = pytest.mark.slow


@pytest_slow
def test_every_record_a_run_writes_follows_the_schema(two_runs):
    for run in two_runs.iterdir():
        for record in read_jsonl(run / "metrics.jsonl"):
            assert track.schema_problems(record, "metrics") == [], record
        for record in read_jsonl(run / "events.jsonl"):
            assert track.schema_problems(record, "events") == [], record


@pytest_slow
def test_plots_and_a_self_contained_report(two_runs):
    run = two_runs / "ratio16"
    for name in ("loss", "lr", "grad_norm", "throughput", "memory", "syntax", "completion"):
        assert valid_png(run / "plots" / f"{name}.png"), name
    assert not list((run / "plots").glob("*.tmp.png"))
    page = (run / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == 7 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<script" not in page and "<link" not in page
    assert not re.search(r"https?://", page)
    assert "completed" in page and "ratio16" in page and "Latest samples (step 6)" in page
    assert page.count("<pre>") == 2 + 1  # two samples and the spec
    lines = [s for s in read_jsonl(run / "samples.jsonl") if s["kind"] == "next_line" and s["step"] == 6]
    assert "Next lines (step 0 and step 6)" in page and lines
    assert all(html.escape(line["target"]) in page for line in lines)


@pytest_slow
def test_job_report_rebuilds_plots_and_report_from_the_files(two_runs, tmp_path):
    copy = tmp_path / "ratio4"
    shutil.copytree(two_runs / "ratio4", copy)
    shutil.rmtree(copy / "plots")
    (copy / "report.html").unlink()
    with (copy / "metrics.jsonl").open("a") as out:
        out.write('{"step": 7, "split": "tr')  # as a crash leaves it
    result = run_job("report", str(copy))
    assert result.returncode == 0, result.stderr
    assert valid_png(copy / "plots" / "loss.png") and (copy / "report.html").is_file()
    assert run_job("report", str(tmp_path / "nothing")).returncode == 2


@pytest_slow
def test_compare_two_runs_with_different_loraplus_ratios(two_runs, tmp_path):
    result = run_job("compare", str(two_runs / "ratio16"), str(two_runs / "ratio4"), "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ratio16", "ratio4"]
    differing = [line.split() for line in lines[1:] if line.startswith(("lora.", "tracking."))]
    assert ["lora.plus_ratio", "16.0", "4.0"] in differing
    assert any(line.split()[:3] == ["best", "val", "loss"] for line in lines)
    assert valid_png(tmp_path / "cmp" / "compare.png")
    as_json = run_job("compare", str(two_runs / "ratio16"), str(two_runs / "ratio4"), "--json",
                      "--out", str(tmp_path / "cmp"))
    table = json.loads(as_json.stdout)
    assert table["lora.plus_ratio"] == {"ratio16": "16.0", "ratio4": "4.0"} and table["status"]["ratio4"] == "completed"
    bad = run_job("compare", str(two_runs / "ratio16"), str(tmp_path / "no-run"))
    assert bad.returncode == 2 and "not a run folder" in bad.stderr


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TFRecord event files under folder (length, crc, event proto, crc per record)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest_slow
def test_tensorboard_gets_the_same_metrics_and_a_missing_tracker_is_only_logged(two_runs):
    run = two_runs / "ratio16"
    scalars = tensorboard_scalars(run / "tensorboard")
    val = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    assert [step for step, _ in scalars["val/loss"]] == [r["step"] for r in val]
    # TensorBoard keeps float32: the float64 figure rounded to 24 significant bits (6e-8 of it), well inside 1e-6.
    assert [v for _, v in scalars["val/loss"]] == pytest.approx([r["loss"] for r in val], rel=1e-6)
    assert len(scalars["train/loss"]) == 6 and "train/lr/lora_B" in scalars
    failed = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "tracker_failed"]
    assert [e["tracker"] for e in failed] == ["wandb"] and "wandb" in failed[0]["error"]
    assert not (two_runs / "ratio4" / "tensorboard").exists()


@pytest_slow
@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no Chromium on this machine (Debian: apt install chromium)")
def test_the_report_renders_in_a_real_browser(two_runs, tmp_path):
    browser = next(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b))
    shot = tmp_path / "report.png"
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                             "--window-size=1200,3000", (two_runs / "ratio16" / "report.html").as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text and plots, not a blank page


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    return sorted(step for step, _ in tensorboard_scalars(folder).get(tag, []))


def test_a_step_reaches_the_trackers_once_across_starts(tmp_path):
    """Records written again after a resume go to the files, not to the trackers, which had them already."""
    from job.spec import build_spec

    spec = build_spec({"train": {"max_steps": 6}, "tracking": {"report_to": ["tensorboard"]}})
    run = tmp_path / "run"
    run.mkdir()

    def train_record(step: int, loss: float) -> dict:
        return {"step": step, "time": 0.0, "split": "train", "loss": loss}

    first = track.RunRecords.open(run)
    first.start_trackers(spec)
    for step in range(1, 6):
        first.metric(train_record(step, 10.0 - step))
    first.close()  # a start that stopped after step 5, its last checkpoint at step 3
    time.sleep(1.1)  # TensorBoard names its file by the second: a real second start comes seconds later
    second = track.RunRecords.open(run)
    second.start_trackers(spec)
    second.rewind(3)
    for step in range(4, 7):
        second.metric(train_record(step, 10.0 - step))
    second.close()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_steps(run / "tensorboard", "train/loss") == [1, 2, 3, 4, 5, 6]


@pytest_slow
def test_steps_replayed_after_a_rollback_reach_tensorboard_once(tmp_path, code_repo):
    # Micro-batches 4 and 5 give NaN: steps 5 and 6 are skipped, then the run rolls back to step 3 and replays.
    spec = tiny_spec(code_repo, tmp_path / "runs", train={"max_steps": 8, "max_bad_steps": 2},
                     checkpoint={"every_steps": 3}, eval={"every_steps": 4, "samples": 0},
                     debug={"nonfinite_micro_batches": [4, 5]}, tracking={"report_to": ["tensorboard"]})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")].count("rollback") == 1
    assert tensorboard_steps(run / "tensorboard", "train/lr/lora_A") == list(range(1, 9))
    assert tensorboard_steps(run / "tensorboard", "val/loss") == [0, 4, 8]

