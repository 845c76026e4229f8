"""Whole runs in real subprocesses: the run folder they leave, and an adapter that stock peft loads."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from job.rundir import read_jsonl

from .conftest import PRECISIONS, PROJECT, TINY, job_command, run_job, tiny_spec, write_spec

pytestmark = pytest.mark.slow


# How far a validation loss recomputed after a reload may be from the recorded one. Full precision: the same float32
# computation in a fresh process, where only the order of float32 sums over the ~500 target tokens may differ: a few
# units of 2^-24 of the loss each, well inside 1e-6 of it. bf16 or fp16: the reload rounds in other places than the run
# (stock peft casts the adapter's fp32 output back to the base's dtype, and the modules trained in full are loaded into
# the base's dtype); each rounding moves a value by at most 2^-8 (bf16's 8 significant bits) or 2^-11 (fp16's 11) of
# itself, and the loss, a mean of log-probabilities, moves by about that share of itself.
RELOAD_TOLERANCE = {"no": 1e-6, "bf16": 2**-8, "fp16": 2**-11}
HALF = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the base's dtype in each precision


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_run_produces_the_whole_run_folder(tmp_path, code_repo, precision):
    # The built-in model's embeddings and output layer trained in full, as the default job does: fp32 modules on a
    # half-width base, which validation, sampling and the best adapter must all handle.
    spec = tiny_spec(code_repo, tmp_path / "runs", train={"mixed_precision": precision},
                     lora={"modules_to_save": ["lm_head", "embed_tokens"]})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)), launcher=job_command(precision))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "t"
    for name in ["job.yaml", "config.json", "state.json", "metrics.jsonl", "events.jsonl", "data/train.jsonl",
                 "data/val.jsonl", "data/manifest.json", "checkpoints/step-00000004/manifest.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "plots/loss.png", "plots/lr.png",
                 "plots/syntax.png", "plots/completion.png", "samples.jsonl", "best/adapter_model.safetensors",
                 "best/best.json",
                 "heartbeat.json", "report.html", "plots/grad_norm.png", "plots/throughput.png", "plots/memory.png",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json"]:
        assert (run / name).is_file(), name

    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "completed" and state["step"] == state["total_steps"] == 6
    config = json.loads((run / "config.json").read_text())
    assert config["spec"]["lora"]["r"] == 4 and config["versions"]["torch"] and config["hardware"]["cpu_cores"] >= 1
    assert config["data"]["files"]["val"] >= 1 and config["data"]["target_tokens"]["train"] > 0

    records = read_jsonl(run / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in val] == [0, 3, 6]
    for r in train:
        assert set(r) >= {"epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes"}
        assert r["lr"]["lora_B"] == pytest.approx(16 * r["lr"]["lora_A"])
    assert val[-1]["loss"] < val[0]["loss"]
    assert val[0]["perplexity"] == pytest.approx(2.718281828 ** val[0]["loss"], rel=1e-6)
    samples = [s for s in read_jsonl(run / "samples.jsonl") if s["kind"] != "next_line"]
    assert [s["step"] for s in samples] == [0, 0, 3, 3, 6, 6]
    for s in samples:
        assert (s["verdict"] in ("parses", "syntax_error", "unfinished")
                and s["ended"] in ("construct", "end_of_text", "token_budget"))
        assert (s["kind"] == "function" and s["language"] == "python"
                and s["prompt"].lstrip().startswith(("def ", "@", "async def ")))
        assert (s["verdict"] == "unfinished") == (s["ended"] == "token_budget")
    for r in val:
        checked = [s for s in samples if s["step"] == r["step"]]
        assert r["syntax_samples"] == 2 and r["syntax_rate"] == sum(s["verdict"] == "parses" for s in checked) / 2
        assert (r["body_tasks"], r["body_identifier_tasks"]) == (2, 2)
        assert r["body_edit_sim"] == pytest.approx(sum(s["edit_sim"] for s in checked) / 2, abs=1e-4)
        lines = [s for s in read_jsonl(run / "samples.jsonl") if s["kind"] == "next_line" and s["step"] == r["step"]]
        assert r["next_line_tasks"] == len(lines) == 16
        assert r["next_line_exact"] == pytest.approx(sum(s["verdict"] == "exact" for s in lines) / 16, abs=1e-4)
        assert all("\n" not in s["completion"] and s["target"].strip() for s in lines)
    best = json.loads((run / "best" / "best.json").read_text())
    assert (best["step"] == state["best_step"]
            and best["val_loss"] == min(r["loss"] for r in val) == state["best_val_loss"])
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")] == ["start", "checkpoint", "complete"]

    config = json.loads((run / "config.json").read_text())
    assert config["plan"]["mixed_precision"] == precision
    from safetensors import safe_open

    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as saved:
        # Saved in fp32 whatever the precision: stock peft casts it to the base's dtype when it loads it.
        assert {saved.get_slice(name).get_dtype() for name in saved.keys()} == {"F32"}
        assert any("embed_tokens" in name for name in saved.keys()) and any("lm_head" in name for name in saved.keys())

    # A fresh process with nothing but stock transformers and peft loads the adapter onto the base in full precision
    # and in the run's half precision, and reproduces the final validation loss.
    check = textwrap.dedent(f"""
        import json, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from job.data import Packed
        from job.evaluate import validate
        from safetensors.torch import load_file
        run = {str(run)!r}
        cache = next((__import__("pathlib").Path(run) / "data" / "cache").glob("*.safetensors"))
        t = load_file(cache)
        val = Packed(t["val.input_ids"].long(), t["val.position_ids"].long(), t["val.labels"].long())
        losses = {{}}
        for name in dict.fromkeys([{HALF[precision]!r}, "float32"]):
            base = AutoModelForCausalLM.from_pretrained(run + "/model", dtype=getattr(torch, name))
            losses["base " + name] = validate(base, val, 4, 2, "cpu")["loss"]
            model = PeftModel.from_pretrained(base, run + "/adapter").eval()
            losses[name] = validate(model, val, 4, 2, "cpu")["loss"]
        tokenizer = AutoTokenizer.from_pretrained(run + "/adapter")
        prompt = tokenizer("def ", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        assert out.shape[1] > prompt["input_ids"].shape[1]
        print(json.dumps(losses))
    """)
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    losses = json.loads(loaded.stdout.strip().splitlines()[-1])
    recorded = val[-1]["loss"]
    tolerance = RELOAD_TOLERANCE[precision] * recorded
    for name, loss in losses.items():
        if name.startswith("base"):
            # Training moved the loss by more than twice the tolerance: the check below would notice a lost adapter.
            assert loss - recorded > 2 * tolerance, losses
        else:
            assert loss == pytest.approx(recorded, abs=tolerance), (name, losses, recorded)

    # A completed run, started again, says so and exits 0 without training.
    begin = time.monotonic()
    again = run_job("run", "--spec", str(tmp_path / "job.yaml"))
    assert again.returncode == 0 and "already complete" in again.stderr
    assert len(read_jsonl(run / "metrics.jsonl")) == len(records)
    assert time.monotonic() - begin < 30


def test_a_local_model_folder_trains(tmp_path, code_repo):
    from job import model
    from job.spec import build_spec

    folder = tmp_path / "models" / "tiny"
    folder.parent.mkdir()
    model.create_tiny_model(build_spec({"train": {"max_steps": 1}, "model": {"tiny": TINY}}), folder,
                            [p.read_text() for p in sorted((code_repo / "job").glob("*.py"))])
    spec = tiny_spec(code_repo, tmp_path / "runs", model={"path": str(folder)}, train={"max_steps": 3},
                     lora={"plus_ratio": None}, schedule={"kind": "cosine"})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr
    assert "Loading weights" not in result.stderr  # transformers' progress bar among the JSON log lines
    run = tmp_path / "runs" / "t"
    assert not (run / "model").exists()
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(folder)
    train = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert list(train[0]["lr"]) == ["lora"]


def test_the_default_job_learns(tmp_path):
    """examples/default.yaml, as `make train` runs it: validation loss ends at least 30% below where it began."""
    launched = time.time()
    result = run_job("run", "--spec", "examples/default.yaml", "--set", f"run.output_dir={tmp_path}", timeout=900)
    ended = time.time()
    assert result.returncode == 0, result.stderr[-3000:]
    val = [r for r in read_jsonl(tmp_path / "default" / "metrics.jsonl") if r["split"] == "val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 240
    assert val[-1]["loss"] <= 0.7 * val[0]["loss"], (val[0]["loss"], val[-1]["loss"])
    # benchmarks/wall_time.py's split of this run's wall time: every part measured, none negative, training most.
    sys.path.insert(0, str(PROJECT / "benchmarks"))
    from wall_time import shares

    parts = dict(shares(tmp_path / "default", launched, ended))
    assert all(seconds >= 0 for seconds in parts.values()), parts
    assert parts["training steps"] > 0.5 * (ended - launched) and parts["evaluation"] > 0 and parts["checkpoints"] > 0
