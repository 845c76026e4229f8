from pathlib import Path

import pytest

from job.spec import JobSpec, SpecError, build_spec, json_schema, load_spec, parse_overrides

from .conftest import PROJECT, write_spec


def problems(raw: dict, overrides=()) -> list[str]:
    with pytest.raises(SpecError) as caught:
        build_spec(raw, parse_overrides(list(overrides)), source="job.yaml")
    return caught.value.problems


def test_default_example_is_valid():
    spec = load_spec(PROJECT / "examples" / "default.yaml")
    assert spec.model.path == "builtin:tiny"
    assert spec.lora.plus_ratio == 16
    assert spec.schedule.kind == "one_cycle" and spec.schedule.pct_start == 0.3


def test_defaults_fill_every_section():
    spec = build_spec({"train": {"max_steps": 5}})
    assert spec.data.val_ratio == 0.1
    assert spec.model.trust_remote_code is False
    assert spec.lora.target_modules == "all-linear"
    assert (spec.schedule.div_factor, spec.schedule.final_div_factor) == (25, 1e4)
    assert spec.quantization.mode == "none"
    assert spec.run_dir == Path("runs/default")


def test_unknown_field_is_named():
    assert problems({"train": {"max_steps": 5}, "lora": {"rank": 8}}) == ["job.yaml: lora.rank: unknown field"]
    assert problems({"train": {"max_steps": 5}, "lorra": {}}) == ["job.yaml: lorra: unknown field"]


def test_wrong_type_and_range_are_named_together():
    found = problems({"train": {"max_steps": "many", "micro_batch_size": 0}, "data": {"val_ratio": 1.5}})
    assert len(found) == 3
    assert any(p.startswith("job.yaml: train.max_steps:") and "'many'" in p for p in found)
    assert any(p.startswith("job.yaml: train.micro_batch_size:") and "greater than or equal to 1" in p for p in found)
    assert any(p.startswith("job.yaml: data.val_ratio:") for p in found)


def test_a_length_must_be_given():
    assert problems({}) == ["job.yaml: (top level): train.epochs or train.max_steps must be given"]


def test_enumerations_are_checked():
    found = problems({"train": {"max_steps": 5}, "schedule": {"kind": "linear"}, "quantization": {"mode": "3bit"}})
    assert {p.split(":")[1].strip() for p in found} == {"schedule.kind", "quantization.mode"}


def test_overrides_are_yaml_typed():
    spec = build_spec({"train": {"epochs": 1}}, parse_overrides(["train.max_steps=20", "lora.plus_ratio=null",
                                                                 "lora.target_modules=[q_proj, v_proj]"]))
    assert spec.train.max_steps == 20
    assert spec.lora.plus_ratio is None
    assert spec.lora.target_modules == ["q_proj", "v_proj"]


def test_override_of_unknown_field_is_an_error():
    assert problems({"train": {"max_steps": 5}}, ["train.max_stepz=3"]) == ["job.yaml: train.max_stepz: unknown field"]
    with pytest.raises(SpecError, match="expected key.path=value"):
        parse_overrides(["train.max_steps"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\ntrain:\n  max_steps: [1, 2\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{path}: YAML syntax error at line ")


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_spec_must_be_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(write_spec(tmp_path / "list.yaml", [1, 2]))


def test_every_field_has_a_description():
    schema = json_schema()
    definitions = schema["$defs"]
    missing = [f"{name}.{field}" for name, d in definitions.items() for field, prop in d["properties"].items()
               if not prop.get("description")]
    missing += [field for field, prop in schema["properties"].items() if not prop.get("description")]
    assert missing == []


def test_run_name_must_be_a_folder_name():
    assert problems({"train": {"max_steps": 1}, "run": {"name": "../escape"}})[0].startswith("job.yaml: run.name:")


def test_tiny_heads_must_divide_hidden():
    assert "multiple of num_heads" in problems({"train": {"max_steps": 1},
                                                "model": {"tiny": {"hidden_size": 30, "num_heads": 4}}})[0]


def test_spec_round_trips_through_json():
    spec = build_spec({"train": {"max_steps": 5}})
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_readme_documents_every_field():
    from job.spec import field_reference

    readme = (PROJECT / "README.md").read_text()
    assert [path for path, _, _ in field_reference() if f"| `{path}` |" not in readme] == []


def test_fields_that_decide_an_early_stop_cannot_change_on_resume():
    from job.spec import result_changes, spec_to_dict

    def resolved(**sections):
        return spec_to_dict(build_spec({"train": {"max_steps": 5}, **sections}))

    plain, stopping = resolved(), resolved(eval={"early_stopping": {"patience": 3}})
    assert result_changes(plain, resolved(eval={"every_steps": 7, "samples": 0, "max_batches": 2})) == []
    assert result_changes(plain, stopping) == ["eval.early_stopping.patience"]
    assert result_changes(stopping, resolved(eval={"early_stopping": {"patience": 3}, "every_steps": 7,
                                                   "samples": 1})) == ["eval.every_steps"]
    assert result_changes(plain, resolved(lora={"r": 8})) == ["lora.r"]


def test_a_sample_budget_must_leave_room_for_its_prompt():
    with pytest.raises(SpecError) as err:
        build_spec({"train": {"max_steps": 1}, "data": {"context_length": 64}, "eval": {"max_new_tokens": 64}})
    assert "eval.max_new_tokens (64) must be less than data.context_length (64)" in str(err.value)
    build_spec({"train": {"max_steps": 1}, "data": {"context_length": 64},
                "eval": {"max_new_tokens": 64, "samples": 0}})
    # Left out, the budget follows the context: a short context is never an error the user did not write.
    assert build_spec({"train": {"max_steps": 1}, "data": {"context_length": 32}}).eval.max_new_tokens == 16
    assert build_spec({"train": {"max_steps": 1}, "data": {"context_length": 4096}}).eval.max_new_tokens == 128


def test_every_example_spec_is_valid():
    for path in sorted((PROJECT / "examples").glob("*.yaml")):
        load_spec(path)


def test_a_value_that_fits_no_alternative_is_one_line_naming_both():
    assert problems({"train": {"max_steps": 1, "micro_batch_size": 0}}) == [
        "job.yaml: train.micro_batch_size: Input should be greater than or equal to 1, or 'auto' (got 0)"]
    assert problems({"train": {"max_steps": 1, "tokens_per_step": 4096}}) == [
        "job.yaml: (top level): train.tokens_per_step is used only with train.grad_accum or "
        "train.micro_batch_size auto"]


def test_a_bare_no_in_yaml_means_no_mixed_precision(tmp_path):
    # YAML reads `no` as false; the spec field takes it as the value it spells.
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  max_steps: 1\n  mixed_precision: no\n")
    assert load_spec(path).train.mixed_precision == "no"
    assert load_spec(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(SpecError, match="train.mixed_precision"):
        load_spec(path, ["train.mixed_precision=yes"])
