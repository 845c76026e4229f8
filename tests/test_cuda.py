"""What only a CUDA GPU can show: the job's CUDA branches run for real. Skipped without one; benchmarks/gpu_check.sh
runs them. Each test names the CUDA-only branch it covers."""

import json
import shutil
import sys

import pytest
import torch

from job import hardware
from job.rundir import read_jsonl

from .conftest import PROJECT, run_job, tiny_spec, write_spec
from .test_resume import comparable, stopped_once, train_steps

pytestmark = [pytest.mark.slow, pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(PROJECT / "job", repo / "job", ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def gpu_spec(repo, out, **sections) -> dict:
    # Dropout and sampling at a temperature draw from the CUDA generator; the modules trained in full are fp32 on a
    # half-width base. Every random state and every dtype boundary is exercised.
    base = {"train": {"max_steps": 6, "grad_accum": 4, "micro_batch_size": 2},
            "lora": {"dropout": 0.1, "modules_to_save": ["lm_head", "embed_tokens"]},
            "eval": {"every_steps": 2, "samples": 2, "temperature": 0.8}, "checkpoint": {"every_steps": 3}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return tiny_spec(repo, out, **base)


def adapter(run) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_resume_mid_accumulation_on_the_gpu_is_bit_for_bit_with_deterministic_algorithms(tmp_path, repo, precision):
    """CUDA branches: pinned host memory and non-blocking copies, CUDA RNG capture and restore in checkpoints, fork_rng
    on CUDA while sampling, gradients restored onto GPU parameters, train.deterministic, fp16's CUDA gradient scaler."""
    spec = gpu_spec(repo, tmp_path / "a", train={"mixed_precision": precision, "deterministic": True},
                    debug={"overflow_micro_batches": [2] if precision == "fp16" else []})
    reference = run_job("run", "--spec", str(write_spec(tmp_path / "a.yaml", spec)))
    assert reference.returncode == 0, reference.stderr[-3000:]
    spec["run"]["output_dir"] = str(tmp_path / "b")
    spec_path = write_spec(tmp_path / "b.yaml", spec)
    run = tmp_path / "b" / "t"
    stopped_once(spec_path, lambda: len(train_steps(run)) >= 2)  # 4 micro-batches a step: most often inside one
    resumed = run_job("run", "--spec", str(spec_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert adapter(run) == adapter(tmp_path / "a" / "t")
    assert comparable(run) == comparable(tmp_path / "a" / "t")
    config = json.loads((run / "config.json").read_text())
    assert config["plan"]["mixed_precision"] == precision and config["plan"]["device"]["kind"] == "cuda"
    if precision == "fp16":
        assert json.loads((run / "state.json").read_text())["overflow_steps"] == 1


def test_without_deterministic_algorithms_a_resume_ends_within_bf16_rounding(tmp_path, repo):
    """Attention's backward pass on a GPU adds in a varying order; the adapter is fp32, but the next forward pass
    rounds its effect to bf16 (8 significant bits): the final validation loss may move by about 2^-8 of itself."""
    spec = gpu_spec(repo, tmp_path / "a", train={"mixed_precision": "bf16"})
    assert run_job("run", "--spec", str(write_spec(tmp_path / "a.yaml", spec))).returncode == 0
    spec["run"]["output_dir"] = str(tmp_path / "b")
    spec_path = write_spec(tmp_path / "b.yaml", spec)
    run = tmp_path / "b" / "t"
    stopped_once(spec_path, lambda: len(train_steps(run)) >= 2)
    assert run_job("run", "--spec", str(spec_path)).returncode == 0
    final = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"][-1]
    expected = [r["loss"] for r in read_jsonl(tmp_path / "a" / "t" / "metrics.jsonl") if r["split"] == "val"][-1]
    assert final == pytest.approx(expected, rel=2**-8)


def test_compile_on_the_gpu(tmp_path, repo):
    """CUDA branch: torch.compile of the training step (inductor, Triton kernels)."""
    spec = gpu_spec(repo, tmp_path / "runs", train={"mixed_precision": "bf16", "compile": True})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    assert json.loads((run / "config.json").read_text())["plan"]["compile"] is True
    assert "compile_failed" not in [e["event"] for e in read_jsonl(run / "events.jsonl")]
    val = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    assert val[-1] < val[0]


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_bitsandbytes_on_the_gpu(tmp_path, repo, mode):
    """CUDA branch: bitsandbytes quantizing while loading onto the GPU (device_map), QLoRA in bf16."""
    spec = gpu_spec(repo, tmp_path / "runs", train={"mixed_precision": "bf16"}, quantization={"mode": mode},
                    lora={"modules_to_save": []}, optim={"lr": 0.01})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert plan["quantization"] == mode and plan["compute_dtype"] == "bfloat16"
    val = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    assert val[-1] < val[0]


def test_an_out_of_memory_step_is_retried_on_the_gpu(tmp_path, repo):
    """CUDA branch: the retry's CUDA RNG restore and torch.cuda.empty_cache after torch.OutOfMemoryError."""
    spec = gpu_spec(repo, tmp_path / "runs", train={"mixed_precision": "bf16"}, debug={"out_of_memory_steps": [1]})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_jsonl(tmp_path / "runs" / "t" / "events.jsonl")
    assert [e["micro_batch"] for e in events if e["event"] == "out_of_memory"] == [1]


def test_the_machine_description_on_the_gpu():
    """CUDA branch: describe() and the plan's device, on a real GPU: free memory of this process's GPU only."""
    described = hardware.describe()["cuda_devices"]
    current = torch.cuda.current_device()
    assert [d["free_memory_bytes"] is not None for d in described] == [i == current for i in range(len(described))]
    native = [torch.cuda.get_device_capability(i)[0] >= 8 for i in range(len(described))]
    assert [d["bf16"] for d in described] == native
    device = hardware.current_device()
    assert device.kind == "cuda" and 0 < device.memory_bytes <= torch.cuda.get_device_properties(current).total_memory


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL with DDP needs two GPUs")
def test_two_ranks_with_nccl(tmp_path, repo):
    """CUDA branch: DDP over NCCL, one GPU a rank (gloo on the CPU is tests/test_end_to_end.py's)."""
    spec = gpu_spec(repo, tmp_path / "runs", train={"mixed_precision": "bf16", "grad_accum": 2})
    result = run_job("run", "--spec", str(write_spec(tmp_path / "job.yaml", spec)),
                     launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "job"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "t" / "config.json").read_text())["plan"]["processes"] == 2


@pytest.mark.parametrize("mode", ["none", "4bit"])
def test_a_sharded_run_on_the_gpu_resumes_bit_for_bit_and_follows_the_unsharded_one(tmp_path, repo, mode):
    """train.fsdp on the GPU, one process (its own process group, NCCL): FSDP2 over CUDA tensors, with 16-bit and with
    4-bit weights packed into bf16 (bnb_4bit_quant_storage). A SIGTERM, most often inside a step, and the resume end
    with the adapter of the uninterrupted sharded run bit for bit; its losses follow the unsharded run's within bf16
    rounding."""
    runs = {}
    for name, fsdp in (("whole", True), ("stopped", True), ("unsharded", False)):
        spec = gpu_spec(repo, tmp_path / name, train={"mixed_precision": "bf16", "deterministic": True, "fsdp": fsdp},
                        quantization={"mode": mode})
        spec_path = write_spec(tmp_path / f"{name}.yaml", spec)
        runs[name] = tmp_path / name / "t"
        if name == "stopped":
            stopped_once(spec_path, lambda: len(train_steps(runs["stopped"])) >= 2)
        result = run_job("run", "--spec", str(spec_path))
        assert result.returncode == 0, result.stderr[-3000:]
    assert adapter(runs["stopped"]) == adapter(runs["whole"])
    assert comparable(runs["stopped"]) == comparable(runs["whole"])
    val = {name: [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
           for name, run in runs.items()}
    assert val["whole"] == pytest.approx(val["unsharded"], rel=2 ** -7)
    plan = json.loads((runs["whole"] / "config.json").read_text())["plan"]
    assert plan["device"]["kind"] == "cuda" and plan["quantization"] == mode
