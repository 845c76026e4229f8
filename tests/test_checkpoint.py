import torch

from job import checkpoint


def make(step: int, micro: int = 0) -> checkpoint.Checkpoint:
    weights = {"lora_A": torch.full((2, 3), float(step)), "lora_B": torch.zeros(3, 2)}
    return checkpoint.Checkpoint(
        step=step,
        trainable=weights,
        optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1], "name": "lora"}]},
        scheduler={"last_epoch": step},
        progress={"step": step, "micro_in_step": micro},
        rng=[checkpoint.capture_rng()],
        grads=[{"lora_A": torch.ones(2, 3)} if micro else {}],
    )


def test_a_mid_step_checkpoint_sits_beside_the_whole_step_one_and_is_newer(tmp_path):
    checkpoint.save_checkpoint(tmp_path, make(6), keep_last=3)
    checkpoint.save_checkpoint(tmp_path, make(6, micro=2), keep_last=3)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-00000006", "step-00000006-0002"]
    newest = checkpoint.newest_good_checkpoint(tmp_path)
    loaded = checkpoint.load_checkpoint(newest)
    assert loaded.progress["micro_in_step"] == 2
    assert torch.equal(loaded.grads[0]["lora_A"], torch.ones(2, 3))
    assert torch.equal(loaded.trainable["lora_A"], torch.full((2, 3), 6.0))


def test_retention_keeps_the_newest_and_never_touches_others(tmp_path):
    for step in (3, 6, 9, 12):
        checkpoint.save_checkpoint(tmp_path, make(step), keep_last=2)
    (tmp_path / "checkpoints" / "notes.txt").write_text("the user's")
    checkpoint.save_checkpoint(tmp_path, make(15), keep_last=2)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-00000012", "step-00000015"]
    assert (tmp_path / "checkpoints" / "notes.txt").read_text() == "the user's"


def test_a_checkpoint_without_its_manifest_is_set_aside(tmp_path):
    checkpoint.save_checkpoint(tmp_path, make(3), keep_last=3)
    torn = checkpoint.save_checkpoint(tmp_path, make(6), keep_last=3)
    (torn / "manifest.json").unlink()  # as if the writer died before the manifest
    seen = []
    assert checkpoint.newest_good_checkpoint(tmp_path,
                                             lambda f, aside, problem: seen.append(problem)).name == "step-00000003"
    assert seen == ["no manifest (the write did not finish)"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".rejected-step-00000006")]


def test_a_start_waits_for_the_lock_up_to_run_lock_wait(tmp_path):
    """run.lock_wait: a start finds the run folder locked (on NFS, a lost node's lock outlives it until its lease
    runs out) and waits for the holder to let go; without it, or past it, it refuses in one line naming the holder."""
    import subprocess
    import sys
    import time

    import pytest

    from job import rundir
    from job.spec import SpecError

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"h = open({str(tmp_path / '.lock')!r}, 'a+')\nfcntl.flock(h, fcntl.LOCK_EX)\n"
                               "h.write('pid 1 on host lost\\n'); h.flush()\n"
                               "print('locked', flush=True)\ntime.sleep(float(sys.argv[1]))", "1.5"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    began = time.monotonic()
    with pytest.raises(SpecError, match=r"already in use by pid 1 on host lost; two processes never write"):
        with rundir.RunLock(tmp_path):
            pass
    with pytest.raises(SpecError, match=r"after waiting 0.2 s, run.lock_wait"):
        with rundir.RunLock(tmp_path, wait=0.2):
            pass
    assert time.monotonic() - began < 1.0
    with rundir.RunLock(tmp_path, wait=30):
        waited = time.monotonic() - began
    assert 1.0 < waited < 30 and holder.wait(timeout=5) == 0


def test_a_file_system_that_keeps_locks_local_is_named():
    """The lock keeps other machines out only where the file system carries it to them: NFS without nolock or
    local_lock, not a FUSE bucket mount. Read from a mount table (the format of /proc/self/mountinfo)."""
    from pathlib import Path

    from job.rundir import local_lock_reason

    mountinfo = "\n".join([
        "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw",
        "40 22 0:35 / /runs rw,relatime shared:2 - nfs4 server:/export rw,vers=4.2,local_lock=none,addr=10.0.0.2",
        "41 40 0:36 / /runs/scratch rw,relatime - nfs server:/scratch rw,vers=3,nolock,local_lock=all,addr=10.0.0.3",
        "42 22 0:37 / /mnt/my\\040bucket rw,nosuid - fuse.gcsfuse my-bucket rw,user_id=0,group_id=0",
    ])
    assert local_lock_reason(Path("/runs/t"), mountinfo) is None
    assert local_lock_reason(Path("/home/me/runs/t"), mountinfo) is None
    assert local_lock_reason(Path("/runs/scratch/t"), mountinfo) == \
        "nfs at /runs/scratch is mounted with local_lock=all: its locks do not reach the server"
    assert local_lock_reason(Path("/mnt/my bucket/runs/t"), mountinfo) == \
        "fuse.gcsfuse at /mnt/my bucket is a bucket mount: its locks do not reach other machines"
    assert local_lock_reason(Path("/runsx/t"), mountinfo) is None  # a prefix of the name is not a parent
