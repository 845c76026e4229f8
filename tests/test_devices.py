"""The branches a CUDA GPU takes, reached on the CPU up to the device call: a GPU's properties are described to the
code that reads them (torch.cuda's answers replaced, nothing else), and the rest runs for real."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from job import hardware, model, session
from job.spec import SpecError, build_spec

from .conftest import TINY
from .test_model import TEXTS


@pytest.fixture
def described_gpus(monkeypatch):
    """Make torch.cuda describe GPUs of the given compute capabilities, this process on the first; returns the indices
    that free memory was asked of (each would cost a CUDA context on that GPU)."""
    asked: list[int] = []

    def describe(*capabilities: tuple[int, int]) -> list[int]:
        names = {(7, 5): "Tesla T4", (7, 0): "Tesla V100", (8, 0): "NVIDIA A100", (9, 0): "NVIDIA H100"}
        props = [SimpleNamespace(name=names[c], major=c[0], minor=c[1], total_memory=16 * 2**30) for c in capabilities]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props[index])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: props[index].name)
        # What torch answers on a T4 or V100 too: it counts emulated bf16 (pytorch/pytorch#148322).
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: asked.append(index) or (8 * 2**30, 16 * 2**30))
        return asked

    return describe


AUTO_4BIT = {"train": {"max_steps": 10}, "quantization": {"mode": "4bit"}}


def test_a_gpu_without_native_bf16_trains_in_fp16_with_fp16_compute(described_gpus):
    described_gpus((7, 5))
    device = hardware.current_device()
    assert (device.kind, device.name, device.bf16) == ("cuda", "Tesla T4", False)
    spec = build_spec(AUTO_4BIT)
    assert hardware.mixed_precision(spec) == "fp16"
    shape = hardware.model_shape(model.tiny_config(spec), spec)
    plan = hardware.make_plan(spec, shape, device)
    assert (plan.mixed_precision, plan.compute_dtype) == ("fp16", "float16")
    assert hardware.describe()["cuda_devices"][0]["bf16"] is False  # config.json says what the plan used
    # bf16 asked for explicitly runs, emulated, and the plan says what that costs.
    forced_spec = build_spec({**AUTO_4BIT, "train": {"max_steps": 10, "mixed_precision": "bf16"}})
    forced = hardware.make_plan(forced_spec, shape, device)
    assert forced.compute_dtype == "bfloat16" and any("emulates it" in reason for reason in forced.reasons)


def test_a_gpu_with_native_bf16_trains_in_bf16(described_gpus):
    described_gpus((8, 0))
    spec = build_spec(AUTO_4BIT)
    assert hardware.current_device().bf16 and hardware.mixed_precision(spec) == "bf16"
    plan = hardware.make_plan(spec, hardware.model_shape(model.tiny_config(spec), spec), hardware.current_device())
    assert (plan.mixed_precision, plan.compute_dtype) == ("bf16", "bfloat16")
    assert not any("emulates" in reason for reason in plan.reasons)


def test_the_machine_description_asks_only_this_process_gpu_for_its_free_memory(described_gpus):
    asked = described_gpus((9, 0), (9, 0), (7, 0), (9, 0))
    described = hardware.describe()["cuda_devices"]
    assert asked == [0]
    assert [d["free_memory_bytes"] for d in described] == [8 * 2**30, None, None, None]
    assert [d["total_memory_bytes"] for d in described] == [16 * 2**30] * 4
    assert [d["bf16"] for d in described] == [True, True, False, True]
    # Choosing the precision asks no GPU for memory: every rank does it before accelerate assigns its GPU.
    asked.clear()
    assert hardware.mixed_precision(build_spec({"train": {"max_steps": 1}})) == "bf16" and asked == []


def test_fp16_is_refused_off_the_gpu_and_accepted_on_one():
    with pytest.raises(SpecError, match=r"^train.mixed_precision: fp16 needs a GPU .* on the cpu\); use bf16 or no$"):
        hardware.check_precision("fp16", "cpu")
    hardware.check_precision("fp16", "cuda")
    for precision in ("no", "bf16"):
        hardware.check_precision(precision, "cpu")


def test_a_checkpoint_gradient_goes_to_its_parameter_device():
    """Checkpoints keep tensors on the host; a GPU parameter takes its gradient back on the GPU (here the meta device
    stands in for it: like a GPU, it refuses a gradient that lives on the host)."""
    on_device = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(RuntimeError, match="device"):
        on_device.grad = torch.ones(3)
    kept = {"w": on_device, "b": torch.nn.Parameter(torch.zeros(2))}
    session.load_trainable(kept, {"w": torch.ones(3), "b": torch.ones(2)}, {"w": torch.full((3,), 2.0)})
    assert on_device.grad.device.type == "meta" and on_device.grad.shape == (3,)
    assert kept["b"].grad is None and torch.equal(kept["b"].detach(), torch.ones(2))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    model.create_tiny_model(build_spec({"train": {"max_steps": 1}, "model": {"tiny": TINY}}), folder, TEXTS)
    return folder


def test_the_base_is_loaded_straight_onto_the_training_device(tiny_folder):
    """Every weight goes to this process's device as it is read, never first to the host, where every rank would hold a
    full copy. The meta device stands in for a GPU: loaded onto the host, the weights would be there instead."""
    spec = build_spec({"train": {"max_steps": 1}, "model": {"tiny": TINY}})
    base = model.load_base_model(tiny_folder, spec, torch.bfloat16, torch.device("meta"))
    assert {(p.device.type, p.dtype) for p in base.parameters()} == {("meta", torch.bfloat16)}


def test_the_liger_set_up_is_reached_with_the_spec(tiny_folder):
    """model.build hands train.liger to Liger's set-up: without liger-kernel (the CPU image) that is a one-line refusal,
    with it (the CUDA image) the base's modules are patched, which needs no GPU until they run."""
    spec = build_spec({"train": {"max_steps": 1, "liger": True}, "model": {"tiny": TINY}})
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(SpecError, match="train.liger: liger-kernel is not installed"):
            model.build(tiny_folder, spec, torch.float32, torch.device("cpu"))
        return
    peft_model = model.build(tiny_folder, spec, torch.float32, torch.device("cpu"))
    assert any(type(m).__name__.startswith("Liger") for m in peft_model.modules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check runs for real (benchmarks/gpu_check.sh)")
def test_the_gpu_check_says_when_there_is_no_gpu_and_its_tests_are_collected(tmp_path):
    import subprocess
    import sys

    from .conftest import PROJECT

    check = subprocess.run(["bash", str(PROJECT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=120,
                           env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert check.returncode == 2 and "has no CUDA GPU" in check.stderr and "nothing was run" in check.stderr
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "tests/test_cuda.py"], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert collected.returncode == 0, collected.stdout[-2000:]
    assert "tests/test_cuda.py: 11" in collected.stdout, collected.stdout  # every test there, none failing to import
