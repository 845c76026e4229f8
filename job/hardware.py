"""What machine this is, and the choices that follow from it (precision, threads)."""

from __future__ import annotations

import os
import platform

import psutil
import torch

from job.spec import JobSpec


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def describe() -> dict:
    """The machine as config.json records it."""
    machine = {
        "platform": platform.platform(),
        "cpu_cores": usable_cores(),
        "memory_bytes": psutil.virtual_memory().total,
        "cuda_devices": [],
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            machine["cuda_devices"].append({
                "name": props.name,
                "total_memory_bytes": total,
                "free_memory_bytes": free,
                "compute_capability": f"{props.major}.{props.minor}",
                "bf16": props.major >= 8,
            })
    return machine


def mixed_precision(spec: JobSpec) -> str:
    """accelerate's mixed_precision value: bf16 on a GPU that has it under auto, full precision on the CPU."""
    choice = spec.train.mixed_precision
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def base_dtype(precision: str) -> torch.dtype:
    """The frozen base weights are stored in the compute precision; the adapter stays in fp32 (peft upcasts it)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def cpu_threads(spec: JobSpec, local_processes: int) -> int:
    # Processes on one machine share its cores: two ranks with all threads each slow each other down several times.
    return spec.train.cpu_threads or max(1, usable_cores() // max(1, local_processes))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
