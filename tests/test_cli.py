"""The command line as a user meets it: help, schema, validate, and one-line errors with exit 2."""

import json

import pytest
import torch

from .conftest import run_job, tiny_spec, tree_snapshot, write_spec


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["schema"]])
def test_every_command_has_help(command):
    result = run_job(*command, "--help")
    assert result.returncode == 0
    assert "usage: job" in result.stdout
    if command in ([], ["run"]):
        assert "exit codes" in result.stdout or "--set" in result.stdout


def test_schema_is_json_with_descriptions():
    result = run_job("schema")
    schema = json.loads(result.stdout)
    assert schema["properties"]["lora"]["description"]
    assert "plus_ratio" in schema["$defs"]["LoraSpec"]["properties"]


def test_validate_says_ok(tmp_path, code_repo):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(code_repo, tmp_path / "runs"))
    result = run_job("validate", "--spec", str(spec))
    assert (result.returncode, result.stdout.strip()) == (0, "ok")
    assert not (tmp_path / "runs").exists()  # validating writes nothing


def test_spec_path_from_environment(tmp_path, code_repo):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(code_repo, tmp_path / "runs"))
    result = run_job("validate", env={"JOB_SPEC": str(spec)})
    assert (result.returncode, result.stdout.strip()) == (0, "ok")


def bad_input_cases(tmp_path, code_repo):
    out = tmp_path / "out"
    good = tiny_spec(code_repo, out)
    empty_repo = tmp_path / "empty_repo"
    empty_repo.mkdir()
    (empty_repo / "blob.bin").write_bytes(b"\x00" * 100)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "custom_thing", "auto_map": {"AutoConfig": "c.C"}}))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    short = tmp_path / "short_model"
    short.mkdir()
    (short / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 32}))
    (short / "model.safetensors").write_bytes(b"")

    def variant(section, **values):
        spec = json.loads(json.dumps(good))
        spec[section].update(values)
        return spec

    return {
        "missing spec": (None, "spec file does not exist"),
        "yaml syntax": ("run:\n  name: [x\n", "YAML syntax error at line"),
        "unknown field": (variant("lora", rank=4), "lora.rank: unknown field"),
        "wrong type": (variant("train", max_steps="ten"), "train.max_steps:"),
        "out of range": (variant("data", val_ratio=2), "data.val_ratio:"),
        "repo missing": (variant("data", repo=str(tmp_path / "nowhere")), "data.repo:"),
        "repo is a file": (variant("data", repo=str(a_file)), "is not a folder"),
        "no usable files": (variant("data", repo=str(empty_repo)), "1 binary"),
        "model missing": (variant("model", path=str(tmp_path / "no_model")), "does not exist"),
        "model without config": (variant("model", path=str(no_config)), "has no config.json"),
        "model needs remote code": (variant("model", path=str(remote)), "model.trust_remote_code"),
        "output not writable": (variant("run", output_dir=str(a_file / "runs")), "run.output_dir:"),
        "context past the model": (variant("model", path=str(short)),
                                   "data.context_length: 64 is more than the model's 32"),
        "fp16 on the cpu": (variant("train", mixed_precision="fp16"), "train.mixed_precision: fp16 needs a GPU"),
    }


CASES = ["missing spec", "yaml syntax", "unknown field", "wrong type", "out of range", "repo missing", "repo is a file",
         "no usable files", "model missing", "model without config", "model needs remote code", "output not writable",
         "context past the model"] + ([] if torch.cuda.is_available() else ["fp16 on the cpu"])


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, code_repo, case, capsys):
    """In this process (the command line's own main), so that thirteen cases do not pay for thirteen interpreters;
    the tests around it run the same command line in a subprocess."""
    from job.cli import main

    content, expected = bad_input_cases(tmp_path, code_repo)[case]
    out = tmp_path / "out"
    (out / "t").mkdir(parents=True)
    (out / "t" / "precious.txt").write_text("the user's file")
    (out / "other-run").mkdir()
    (out / "other-run" / "state.json").write_text('{"status": "completed"}')
    before = tree_snapshot(out)
    spec_path = tmp_path / "job.yaml"
    if isinstance(content, str):
        spec_path.write_text(content)
    elif isinstance(content, dict):
        write_spec(spec_path, content)
    code = main(["run", "--spec", str(spec_path)])
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]
    assert "Traceback" not in stderr
    after = tree_snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before


def test_validate_reports_every_problem(tmp_path, code_repo):
    spec = tiny_spec(code_repo, tmp_path / "out")
    spec["data"]["repo"] = str(tmp_path / "nowhere")
    spec["model"]["path"] = str(tmp_path / "no_model")
    result = run_job("validate", "--spec", str(write_spec(tmp_path / "job.yaml", spec)))
    assert result.returncode == 2
    assert [line.split(":")[1].strip() for line in result.stderr.strip().splitlines()] == ["data.repo", "model.path"]
