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
