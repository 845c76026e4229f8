"""`python tests/cpu_fp16.py run --spec ...`: the job in fp16 mixed precision on the CPU, as accelerate runs it on a
GPU.

accelerate gives fp16 autocast and a gradient scaler to GPUs only, and the job refuses fp16 on the CPU. torch itself has
both for the CPU (torch.autocast("cpu", float16), torch.amp.GradScaler("cpu")): switching them on where accelerate would
on a GPU lets the tests reach every fp16 path (scaled backward, unscaled clipping, skipped overflows, the scaler's state
in checkpoints) in real processes on any machine."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from job import cli, hardware, train  # noqa: E402

hardware.FP16_DEVICES = (*hardware.FP16_DEVICES, "cpu")
accelerator_of = train.make_accelerator


def fp16_on_the_cpu(precision: str):
    accelerator = accelerator_of(precision)
    if precision == "fp16" and accelerator.device.type == "cpu":
        # What accelerate's Accelerator.__init__ sets for fp16 on a GPU.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


train.make_accelerator = fp16_on_the_cpu

if __name__ == "__main__":
    sys.exit(cli.main())
