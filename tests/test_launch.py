"""Several processes and machines through `job launch` (torchrun, gloo, one thread a rank): the exit codes a supervisor
sees through the launcher, group restarts after a lost worker or node, and two nodes on loopback. Every finished run
must equal one uninterrupted 2-rank run on one machine, bit for bit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.launch import contract_code
from job.rundir import read_jsonl

from .conftest import PROJECT, project_env, run_job, tiny_spec, write_spec
from .test_resume import STEPS, same_result, samples, train_steps, wait_for

# Above any gradient norm these runs reach: the repository they learn is this package's own code, which every change
# rewrites, and a sharded run's norm (summed shard by shard) must never be clipped (see the sharded test).
LAUNCH_MAX_GRAD_NORM = 10.0


def launch_spec(repo: Path, out: Path) -> dict:
    # One thread a rank on one machine or two: the thread count decides how floats are summed, so it must not differ.
    return tiny_spec(repo, out, train={"max_steps": STEPS, "micro_batch_size": 2, "cpu_threads": 1},
                     eval={"every_steps": 4, "max_batches": 2}, checkpoint={"every_steps": 3, "keep_last": 2},
                     lora={"dropout": 0.1}, optim={"max_grad_norm": LAUNCH_MAX_GRAD_NORM})


def launch(spec_path: Path, *torchrun_args: str) -> subprocess.Popen:
    """`job launch` in its own process group, as a container's first process: signals reach the launcher alone."""
    return subprocess.Popen([sys.executable, "-m", "job", "launch", *torchrun_args, "--spec", str(spec_path)],
                            cwd=PROJECT, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finished(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers: nothing is left running
        _, stderr = process.communicate()
        pytest.fail(f"still running after {timeout} s:\n{stderr[-5000:]}")
    return process.returncode, stderr


def workers_of(launcher: subprocess.Popen) -> dict[int, int]:
    """The launcher's worker processes by local rank (read from /proc: the environment torchrun gave each)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != \
                    launcher.pid:
                continue
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if "LOCAL_RANK" in environ:
            workers[int(environ["LOCAL_RANK"])] = int(entry.name)
    return workers


def launcher_of(spec_path: Path) -> int:
    """The process running `job launch` on this spec (its workers run `job run`)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and b"launch" in argv and str(spec_path).encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no launcher of {spec_path}")


def global_rank(worker: int) -> int:
    entries = Path(f"/proc/{worker}/environ").read_text().split("\0")
    return int(dict(item.split("=", 1) for item in entries if "=" in item)["RANK"])


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One uninterrupted run on 2 processes of one machine, that every run here is compared with."""
    root = tmp_path_factory.mktemp("two-ranks")
    repo = root / "repo"
    import shutil

    shutil.copytree(PROJECT / "job", repo / "job", ignore=shutil.ignore_patterns("__pycache__"))
    code, stderr = finished(launch(write_spec(root / "job.yaml", launch_spec(repo, root / "runs")),
                                   "--nproc-per-node", "2"))
    assert code == 0, stderr[-3000:]
    return repo, root / "runs" / "t"


def test_the_workers_exit_codes_keep_the_contract():
    assert contract_code([0, 2]) == 2 and contract_code([1, 3]) == 3 and contract_code([75, 1]) == 75
    assert contract_code([75, 75]) == 75 and contract_code([1, -9]) == 1 and contract_code([2, 75, 3]) == 2


@pytest.mark.slow
def test_two_processes_train_and_only_the_main_one_writes(two_ranks):
    _, run = two_ranks
    config = json.loads((run / "config.json").read_text())
    assert config["plan"]["processes"] == 2 and config["plan"]["sequences_per_step"] == 4
    records = read_jsonl(run / "metrics.jsonl")
    assert train_steps(run) == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r["split"] == "val"] == [0, 4, 8, 12]
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")] == ["start"] + ["checkpoint"] * 3 + ["complete"]
    assert json.loads((run / "state.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in run.parent.iterdir()) == ["t"]  # no file from rank 1 anywhere


def test_a_refused_spec_exits_2_before_any_worker_starts(tmp_path):
    spec = tiny_spec(tmp_path / "no-repo", tmp_path / "runs")
    began = time.monotonic()
    code, stderr = finished(launch(write_spec(tmp_path / "job.yaml", spec), "--nproc-per-node", "2",
                                   "--max-restarts", "3"))
    assert code == 2 and stderr.startswith("error: data.repo:") and len(stderr.splitlines()) == 1, stderr
    assert time.monotonic() - began < 30 and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_exits_75(tmp_path, two_ranks):
    """Kubernetes and Slurm signal the launcher. torchrun passes SIGTERM on to every worker; they agree to stop, save
    one checkpoint holding both ranks' random states, and exit 75, which torchrun alone would turn into 1."""
    repo, reference = two_ranks
    spec_path = write_spec(tmp_path / "job.yaml", launch_spec(repo, tmp_path / "runs"))
    run = tmp_path / "runs" / "t"
    process = launch(spec_path, "--nproc-per-node", "2")
    wait_for(lambda: len(train_steps(run)) >= 5, process)
    process.send_signal(signal.SIGTERM)
    code, stderr = finished(process, 120)
    assert code == 75, stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["status"] == "stopped"
    newest = max((run / "checkpoints").iterdir())
    assert len(json.loads((newest / "rng.json").read_text())) == 2
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")][-2:] == ["checkpoint", "stopped"]

    code, stderr = finished(launch(spec_path, "--nproc-per-node", "2"))
    assert code == 0, stderr[-3000:]
    same_result(run, reference)


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_which_resumes_to_the_same_adapter(tmp_path, two_ranks):
    """SIGKILL rank 1 after a checkpoint: torchrun (--max-restarts) stops rank 0 and starts both again, and the job
    resumes from the newest good checkpoint; records written after it are replaced, never duplicated."""
    repo, reference = two_ranks
    spec_path = write_spec(tmp_path / "job.yaml", launch_spec(repo, tmp_path / "runs"))
    run = tmp_path / "runs" / "t"
    process = launch(spec_path, "--nproc-per-node", "2", "--max-restarts", "1")
    wait_for(lambda: len(train_steps(run)) >= 5 and len(workers_of(process)) == 2, process)
    os.kill(workers_of(process)[1], signal.SIGKILL)
    code, stderr = finished(process, 120)
    assert code == 0, stderr[-3000:]
    same_result(run, reference)
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")].count("resume") == 1


@pytest.mark.slow
def test_two_nodes_on_loopback_give_the_same_adapter_as_one_node(tmp_path, two_ranks):
    """Two torchrun agents with one process each meet at a c10d rendezvous on 127.0.0.1. The global ranks, the
    data each reads, the seeds and the threads are those of 2 processes on one machine, and gloo sums the two ranks'
    gradients exactly (a + b == b + a in floating point), so the adapter is the same to the bit."""
    repo, reference = two_ranks
    spec_path = write_spec(tmp_path / "job.yaml", launch_spec(repo, tmp_path / "runs"))
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "loopback"]
    first, second = launch(spec_path, *node), launch(spec_path, *node)
    for process in (first, second):
        code, stderr = finished(process)
        assert code == 0, stderr[-3000:]
    run = tmp_path / "runs" / "t"
    same_result(run, reference)
    assert json.loads((run / "config.json").read_text())["plan"]["processes"] == 2


@pytest.mark.slow
def test_a_killed_agent_of_the_second_node_is_replaced_and_the_group_resumes(tmp_path, two_ranks):
    """Two loopback nodes under --max-restarts 1. The agent of the second node (global rank 1) and its worker are
    SIGKILLed, as when its machine is lost; the first node's worker fails on its next collective and its agent waits
    at the rendezvous for a second node. A new agent takes the lost one's place, as a supervisor would start it, and
    the group resumes from the newest checkpoint to the same adapter as one uninterrupted run."""
    repo, reference = two_ranks
    spec_path = write_spec(tmp_path / "job.yaml", launch_spec(repo, tmp_path / "runs"))
    run = tmp_path / "runs" / "t"
    port = free_port()
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--max-restarts", "1",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lost-node"]
    # On loopback both agents could host the rendezvous store; on real machines the first node's does, and keeps it.
    first = launch(spec_path, *node, "--rdzv-conf", "is_host=1")
    wait_for(lambda: port_open(port), first)
    second = launch(spec_path, *node, "--rdzv-conf", "is_host=0")
    wait_for(lambda: len(train_steps(run)) >= 5 and (run / "checkpoints").is_dir() and workers_of(second), first)
    worker = workers_of(second)[0]
    assert global_rank(worker) == 1  # ranks follow the agents' order (pid order on one machine)
    # The machine is lost: its agent and its worker (torchrun starts each worker in a session of its own).
    for pid in (second.pid, worker):
        os.kill(pid, signal.SIGKILL)
    second.communicate()
    replacement = launch(spec_path, *node, "--rdzv-conf", "is_host=0")
    for process in (first, replacement):
        code, stderr = finished(process)
        assert code == 0, stderr[-3000:]
    same_result(run, reference)
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")].count("resume") == 1


@pytest.mark.slow
def test_the_slurm_script_requeues_a_run_stopped_ahead_of_its_time_limit(tmp_path, two_ranks):
    """deploy/slurm/job.sbatch on one node, with srun and scontrol played by two small scripts. Slurm's SIGTERM
    ahead of the time limit reaches the job step's task, the launcher: the job checkpoints, exits 75, and the script
    requeues itself. Started again, as the requeued job is, it resumes, ends 0 and requeues nothing."""
    repo, _ = two_ranks
    spec_path = write_spec(tmp_path / "job.yaml", launch_spec(repo, tmp_path / "runs"))
    run = tmp_path / "runs" / "t"
    shims, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    shims.mkdir()
    # srun on one node: its task is the command itself (the options before it are srun's).
    (shims / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (shims / "scontrol").write_text('#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then echo localhost; '
                                    'else echo "$*" >> "$SCONTROL_CALLS"; fi\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = {**project_env(), "PATH": os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "SLURM_JOB_ID": "42", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "1",
           "SPEC": str(spec_path), "RDZV_PORT": str(free_port()), "SCONTROL_CALLS": str(calls)}

    def sbatch() -> subprocess.Popen:
        return subprocess.Popen(["bash", str(PROJECT / "deploy" / "slurm" / "job.sbatch")], cwd=PROJECT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    script = sbatch()
    wait_for(lambda: len(train_steps(run)) >= 5, script)
    os.kill(launcher_of(spec_path), signal.SIGTERM)
    code, stderr = finished(script, 120)
    assert code == 75, stderr[-3000:]
    assert calls.read_text() == "requeue 42\n"
    assert json.loads((run / "state.json").read_text())["status"] == "stopped"

    code, stderr = finished(sbatch())
    assert code == 0, stderr[-3000:]
    assert calls.read_text() == "requeue 42\n" and train_steps(run)[-1] == STEPS


@pytest.mark.slow
def test_a_run_goes_on_with_fewer_or_more_processes_reading_every_sequence_once(tmp_path):
    """One process, then two, then one again, each start stopped by SIGTERM wherever it is. The global batch stays
    (8 sequences: grad_accum 4 on one process, 2 on two) and the data order is one stream over all processes, so the
    steps read the seeded epoch permutations in turn, into the second epoch, no sequence twice and none left out. A
    step stopped inside is done again from its first micro-batch."""
    from job.data import DataOrder

    repo = tmp_path / "repo"
    (repo / "job").mkdir(parents=True)
    for name in ("__init__.py", "cadence.py", "launch.py", "log.py", "rundir.py"):
        (repo / "job" / name).write_text((PROJECT / "job" / name).read_text())
    spec = launch_spec(repo, tmp_path / "runs")
    spec["train"].update(grad_accum=4, micro_batch_size=2)
    spec["checkpoint"]["every_steps"] = 2
    spec["debug"] = {"record_batches": True}
    spec_path = write_spec(tmp_path / "job.yaml", spec)
    run = tmp_path / "runs" / "t"

    def stopped_after(process: subprocess.Popen, steps: int) -> None:
        wait_for(lambda: len(train_steps(run)) >= steps, process)
        process.send_signal(signal.SIGTERM)
        code, stderr = finished(process, 120)
        assert code == 75, stderr[-3000:]

    stopped_after(subprocess.Popen([sys.executable, "-m", "job", "run", "--spec", str(spec_path)], cwd=PROJECT,
                                   env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 3)
    stopped_after(launch(spec_path, "--nproc-per-node", "2"), 8)
    result = run_job("run", "--spec", str(spec_path))
    assert result.returncode == 0, result.stderr[-3000:]

    changes = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "processes_changed"]
    assert [(e["from_processes"], e["processes"], e["from_grad_accum"], e["grad_accum"]) for e in changes] == \
        [(1, 2, 4, 2), (2, 1, 2, 4)]
    starts = [(e["event"], e["processes"], e["grad_accum"]) for e in read_jsonl(run / "events.jsonl")
              if e["event"] in ("start", "resume")]
    assert starts == [("start", 1, 4), ("resume", 2, 2), ("resume", 1, 4)]
    steps = read_jsonl(run / "batches.jsonl")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)) == train_steps(run)
    assert all(len(r["sequences"]) == 4 and all(len(b) == 2 for b in r["sequences"]) for r in steps)
    sequences = json.loads((run / "config.json").read_text())["data"]["sequences"]["train"]
    assert STEPS * 8 > sequences, "the run must reach its second epoch"
    read = [index for r in steps for batch in r["sequences"] for index in batch]
    order = DataOrder(0, sequences, 2)
    assert read == [index for b in range(STEPS * 4) for index in order.indices(b).tolist()]
    assert sorted(read[:sequences]) == list(range(sequences))  # the first epoch: every sequence once
    assert len(set(read[sequences:])) == len(read) - sequences  # the second: none twice so far
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def figures(run: Path) -> list[tuple]:
    """Every record's loss and rates, with the gradient norms apart (a sharded run sums them in another order)."""
    return [(r["split"], r["step"], r["loss"], json.dumps(r.get("lr"))) for r in read_jsonl(run / "metrics.jsonl")]


def grad_norms(run: Path) -> list[float]:
    return [r["grad_norm"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]


def adapter_bytes(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def stopped_and_resumed(spec_path: Path, run: Path) -> None:
    """Two processes, SIGTERM to the launcher after step 5, then a start that finishes the run."""
    process = launch(spec_path, "--nproc-per-node", "2")
    wait_for(lambda: len(train_steps(run)) >= 5, process)
    process.send_signal(signal.SIGTERM)
    code, stderr = finished(process, 120)
    assert code == 75, stderr[-3000:]
    code, stderr = finished(launch(spec_path, "--nproc-per-node", "2"))
    assert code == 0, stderr[-3000:]


@pytest.mark.slow
def test_a_sharded_run_trains_as_the_unsharded_one_and_resumes_bit_for_bit(tmp_path, two_ranks):
    """train.fsdp on 2 CPU ranks (gloo): FSDP2 gathers each layer whole for its pass and reduce-scatters the
    gradients. The mean of two ranks' gradients is exact either way (halving is exact in binary floating point), so
    every loss, rate and sample equals the unsharded 2-rank run's. Only the gradient norm is summed shard by shard, in
    another order; it stays under optim.max_grad_norm, so no clipping passes the difference on, and the adapter is the
    same to the bit, through a SIGTERM and a resume that gathered the shards into one checkpoint."""
    repo, reference = two_ranks
    spec = launch_spec(repo, tmp_path / "runs")
    spec["train"]["fsdp"] = True
    run = tmp_path / "runs" / "t"
    stopped_and_resumed(write_spec(tmp_path / "job.yaml", spec), run)
    assert figures(run) == figures(reference) and samples(run) == samples(reference)
    assert grad_norms(run) == pytest.approx(grad_norms(reference), rel=1e-6)
    assert max(grad_norms(run)) < LAUNCH_MAX_GRAD_NORM
    assert adapter_bytes(run) == adapter_bytes(reference)
    assert train_steps(run) == list(range(1, STEPS + 1))
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert any(reason.startswith("sharded over 2 processes") for reason in plan["reasons"])


@pytest.mark.slow
def test_4bit_weights_are_sharded_too_and_the_adapter_loads_in_stock_peft(tmp_path, two_ranks):
    """QLoRA + FSDP: the 4-bit weights are packed into fp32 elements (bnb_4bit_quant_storage) so that FSDP2 shards
    them like any tensor. A run stopped by SIGTERM, often inside a step (2 micro-batches a step: the partial gradients
    are saved whole, once, and each process's share of the step's loss), resumes to the same adapter and figures bit
    for bit. Stock peft loads the adapter onto the unquantized base."""
    repo, _ = two_ranks
    runs = {}
    for name in ("whole", "stopped"):
        spec = launch_spec(repo, tmp_path / name)
        spec["train"].update(fsdp=True, max_steps=8, grad_accum=2)
        spec["quantization"] = {"mode": "4bit"}
        runs[name] = tmp_path / name / "t"
        spec_path = write_spec(tmp_path / f"{name}.yaml", spec)
        if name == "stopped":
            stopped_and_resumed(spec_path, runs[name])
        else:
            code, stderr = finished(launch(spec_path, "--nproc-per-node", "2"))
            assert code == 0, stderr[-3000:]
    assert figures(runs["stopped"]) == figures(runs["whole"])
    assert grad_norms(runs["stopped"]) == grad_norms(runs["whole"])
    assert adapter_bytes(runs["stopped"]) == adapter_bytes(runs["whole"])

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(runs["stopped"] / "model")
    loaded = PeftModel.from_pretrained(base, runs["stopped"] / "adapter")
    saved = load_file(runs["stopped"] / "adapter" / "adapter_model.safetensors")
    weights = {name.replace(".default", ""): p for name, p in loaded.named_parameters() if "lora_" in name}
    assert saved and all(torch_equal(weights[name], tensor) for name, tensor in saved.items())


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.detach(), b)
