"""QLoRA on the CPU (bitsandbytes 4-bit), auto plans, and the out-of-memory retry, with real runs and signals."""

import json
import signal
from pathlib import Path

import pytest
import torch

from job.rundir import read_jsonl

from .conftest import run_job, tiny_spec, write_spec
from .test_resume import start, train_steps, wait_for

pytestmark = pytest.mark.slow

STEPS = 8


def qlora_spec(repo: Path, out: Path, name: str, precision: str, **evaluation) -> dict:
    return tiny_spec(repo, out, run={"name": name}, quantization={"mode": "4bit"}, lora={"dropout": 0.1},
                     optim={"lr": 0.01}, train={"max_steps": STEPS, "mixed_precision": precision},
                     eval={"every_steps": 2, **evaluation},
                     checkpoint={"every_steps": 3})


def adapter_bytes(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


# The 4-bit weights are dequantized to the mixed precision's dtype: float32 in full precision, bfloat16 under bf16.
@pytest.mark.parametrize("precision, compute_dtype", [("no", "float32"), ("bf16", "bfloat16")])
def test_a_4bit_run_learns_resumes_bit_for_bit_and_its_adapter_fits_the_unquantized_base(tmp_path, code_repo, precision,
                                                                                         compute_dtype):
    out = tmp_path / "runs"
    # Evaluating and sampling every other step ...
    busy = qlora_spec(code_repo, out, "busy", precision, samples=2, temperature=0.8)
    result = run_job("run", "--spec", str(write_spec(tmp_path / "busy.yaml", busy)))
    assert result.returncode == 0, result.stderr[-3000:]
    # ... against evaluating only at both ends, killed by SIGTERM halfway and resumed: the same adapter, bit for bit.
    quiet = qlora_spec(code_repo, out, "quiet", precision, every_steps=100, samples=0)
    quiet_path = write_spec(tmp_path / "quiet.yaml", quiet)
    quiet = out / "quiet"
    process = start(quiet_path)
    wait_for(lambda: len(train_steps(quiet)) >= 4, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 75
    assert 4 <= json.loads((quiet / "state.json").read_text())["step"] < STEPS
    result = run_job("run", "--spec", str(quiet_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert adapter_bytes(quiet) == adapter_bytes(out / "busy")
    assert [e["event"] for e in read_jsonl(quiet / "events.jsonl")].count("resume") == 1

    run = out / "busy"
    val = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    # It learns: 8 steps at lr 0.01 take the tiny model's validation loss down by a few hundredths, not monotonically.
    losses = [r["loss"] for r in val]
    assert val[-1]["loss"] < val[0]["loss"] and min(losses[1:]) < losses[0] - 0.03, losses
    config = json.loads((run / "config.json").read_text())
    assert config["spec"]["quantization"] == {"mode": "4bit", "quant_type": "nf4", "double_quant": True,
                                              "compute_dtype": "auto"}
    assert config["plan"]["quantization"] == "4bit" and config["plan"]["compute_dtype"] == compute_dtype
    assert config["plan"]["mixed_precision"] == precision
    assert config["versions"]["bitsandbytes"] == "0.50.2"
    assert all(r["peak_memory_bytes"] > 0 for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train")

    # Stock peft puts the adapter on the base model loaded in full precision, with no quantization in sight.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from job.data import Packed
    from job.evaluate import validate

    base = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter")
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    from safetensors.torch import load_file

    tensors = load_file(next((run / "data" / "cache").glob("packed-*.safetensors")))
    packed = Packed(*(tensors[f"val.{name}"].long() for name in ("input_ids", "position_ids", "labels")))
    loss = validate(model, packed, 4, 2, torch.device("cpu"))["loss"]
    # Only NF4's error in the base separates it from the 4-bit model's own last validation. That is no rounding: each
    # weight moves by up to about 1/16 of its block's largest, and what that does to the loss depends on the model. On
    # this tiny model, whose predictions are still nearly uniform, it is under 1e-4 of the loss (measured 7e-5 in
    # full precision, 6e-5 under bf16, whose 2^-8 roundings add to it); 1e-3 leaves room, and training moved the
    # loss by 0.05 (8 times more): a lost adapter fails here.
    assert abs(loss - val[-1]["loss"]) < 1e-3 * val[-1]["loss"], (loss, val[-1]["loss"])


def train_losses(run: Path) -> list[tuple[int, float, str]]:
    return [(r["step"], r["loss"], json.dumps(r["lr"])) for r in read_jsonl(run / "metrics.jsonl")
            if r["split"] == "train"]


def test_out_of_memory_halves_the_micro_batch_keeps_the_schedule_and_lasts_across_restarts(tmp_path, code_repo):
    out = tmp_path / "runs"
    plain = tiny_spec(code_repo, out, run={"name": "plain"}, eval={"samples": 0})
    assert run_job("run", "--spec", str(write_spec(tmp_path / "plain.yaml", plain))).returncode == 0
    # The first attempt of step 1 runs out of memory; the run is stopped after step 3 and resumed.
    failing = tiny_spec(code_repo, out, run={"name": "oom"}, eval={"samples": 0}, debug={"out_of_memory_steps": [1]})
    spec_path = write_spec(tmp_path / "oom.yaml", failing)
    run = out / "oom"
    process = start(spec_path)
    wait_for(lambda: len(train_steps(run)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 75
    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0, result.stderr[-3000:]

    events = read_jsonl(run / "events.jsonl")
    retries = [e for e in events if e["event"] == "out_of_memory"]
    assert (len(retries) == 1 and retries[0]["step"] == 1 and retries[0]["micro_batch"] == 2
            and retries[0]["grad_accum"] == 2)
    assert "debug.out_of_memory_steps" in retries[0]["error"]
    starts = [e for e in events if e["event"] in ("start", "resume")]
    assert [(e["event"], e["micro_batch"]) for e in starts] == [("start", 4), ("resume", 2)]
    assert json.loads((run / "state.json").read_text())["micro_batch_splits"] == 2
    # The same steps, sequences and learning rates; the loss differs only by the order of float32 sums: the same
    # ~250 token losses a step summed in two halves, at most n * 2^-24 = 1.5e-5 of the loss (measured 2e-7), and
    # the weights differ by as little, so later steps too: 1e-4 leaves room.
    retried, reference = train_losses(run), train_losses(out / "plain")
    assert [(s, lr) for s, _, lr in retried] == [(s, lr) for s, _, lr in reference] and len(retried) == 6
    assert all(abs(a - b) < 1e-4 * b for (_, a, _), (_, b, _) in zip(retried, reference)), (retried, reference)


def test_out_of_memory_at_one_sequence_exits_2_and_says_what_would_fit(tmp_path, code_repo):
    spec = tiny_spec(code_repo, tmp_path / "runs", train={"micro_batch_size": 1}, eval={"samples": 0},
                     debug={"out_of_memory_steps": [2]})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: train.micro_batch_size: out of memory at step 2 with 1 sequence of 64 tokens"), \
        error
    assert "memory estimate" in error
    state = json.loads((tmp_path / "runs" / "t" / "state.json").read_text())
    assert state["status"] == "failed" and state["step"] == 2 and "out of memory" in state["errors"][-1]


def test_auto_fields_are_planned_once_recorded_and_kept_by_later_starts(tmp_path, code_repo):
    from job import hardware
    from job.spec import build_spec
    from job.train import _plan

    raw = tiny_spec(code_repo, tmp_path / "runs", data={"context_length": "auto", "max_context_length": 128},
                    train={"max_steps": 3, "micro_batch_size": "auto", "grad_accum": "auto", "tokens_per_step": 1024,
                           "gradient_checkpointing": "auto"},
                    quantization={"mode": "auto"}, eval={"every_steps": 3, "samples": 1, "max_new_tokens": None})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", raw)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    config = json.loads((run / "config.json").read_text())
    assert config["spec"]["data"]["context_length"] == "auto" and config["spec"]["train"]["micro_batch_size"] == "auto"
    plan = config["plan"]
    # This machine has gigabytes to spare for the tiny model: the cap, no quantization, no recomputation.
    assert (plan["context_length"], plan["micro_batch_size"], plan["grad_accum"]) == (128, 8, 1)
    assert plan["quantization"] == "none" and plan["gradient_checkpointing"] is False and plan["fits"]
    assert config["resolved"]["data"]["context_length"] == 128 and config["resolved"]["eval"]["max_new_tokens"] == 64
    assert plan["sequences_per_step"] == 8 and plan["tokens_per_step"] == 1024
    assert any("plan" in line and "context 128" in line for line in result.stderr.splitlines())
    # A later start keeps that plan whatever this machine's memory says now.
    spec = build_spec({**raw, "train": {**raw["train"], "memory_fraction": 0.001}})
    assert hardware.make_plan(spec, hardware.model_shape(hardware.model_config(spec), spec),
                              hardware.current_device()).fits is False
    kept = _plan(spec, run, 1)
    assert ((kept.context_length, kept.micro_batch_size, kept.predicted_peak_bytes)
            == (128, 8, plan["predicted_peak_bytes"]))
    assert "predicted peak" in (run / "report.html").read_text()
