"""`job launch`: torchrun running `job run` on every process, with the job's exit codes kept.

torchrun itself exits 1 whenever a worker fails, whatever its code, and 1 with a traceback when it is signalled, so a
supervisor behind it could not tell a refused spec (2) or a stop after a checkpoint (75) from a crash. This is
torchrun's own code (torch.distributed.run: the same options, PET_* variables and rendezvous) called in process,
with its outcome read back into the contract."""

from __future__ import annotations

import os
import sys
import time

from job import EXIT_BUDGET, EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_STOPPED, rundir
from job.spec import JobSpec


def contract_code(worker_codes: list[int]) -> int:
    """What the workers' exit codes mean together: a refusal or a spent budget first (a restart cannot help), then a
    stop after a checkpoint (a rank exits 75 only once the checkpoint is complete on every rank), else a failure."""
    for code in (EXIT_INVALID, EXIT_BUDGET, EXIT_STOPPED):
        if code in worker_codes:
            return code
    return EXIT_FAILED


def stopped_since(spec: JobSpec, launched: float) -> bool:
    """Whether the run recorded a stop after a checkpoint during this launch (every node reads the shared folder)."""
    state = rundir.read_state(spec.run_dir)
    return state is not None and state.status == "stopped" and state.updated >= launched


def launch(spec: JobSpec, torchrun_args: list[str], job_args: list[str]) -> int:
    """Run torchrun with `-m job run JOB_ARGS` as its workers' command; return the contract's exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args([*torchrun_args, "--module", "job", "run", *job_args])
    # The c10d rendezvous shares one store across group restarts by default, and a worker of the next attempt
    # could read a dead worker's address from it and wait for that worker forever (seen with gloo). Unshared, every
    # attempt's rank 0 serves a store of its own on a fresh port.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    launched = time.time()
    try:
        torchrun.run(args)
    except ChildFailedError as failed:
        codes = [failure.exitcode for failure in failed.failures.values()]
        code = contract_code(codes)
        sys.stderr.write(f"launch: workers exited {sorted(set(codes))}: exit {code}\n")
        return code
    except SignalException as signalled:
        # torchrun passed the signal on to the workers and waited for them (--shutdown-timeout) before raising.
        code = EXIT_STOPPED if stopped_since(spec, launched) else EXIT_FAILED
        sys.stderr.write(f"launch: stopped by signal {signalled.sigval.name}: exit {code}\n")
        return code
    return EXIT_OK
