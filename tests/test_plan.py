"""The hardware plan: the memory estimate against measured activations, and the choices on described machines."""

import json

import pytest
import torch
import torch.nn.functional as F

from job import hardware
from job.spec import SpecError, build_spec

from .conftest import run_job, write_spec

GB = 10**9


def phi2_config():
    """Phi-2's shape (2.7B parameters), never its weights."""
    from transformers import PhiConfig

    return PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                     num_attention_heads=32, max_position_embeddings=2048, partial_rotary_factor=0.4,
                     tie_word_embeddings=False)


def llama7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


AUTO = {"data": {"context_length": "auto"}, "quantization": {"mode": "auto"},
        "train": {"max_steps": 10, "micro_batch_size": "auto", "grad_accum": "auto", "tokens_per_step": 65536,
                  "gradient_checkpointing": "auto"}}


@pytest.fixture(scope="module")
def shapes():
    spec = build_spec(AUTO)
    return {"phi-2": hardware.model_shape(phi2_config(), spec),
            "llama-7b": hardware.model_shape(llama7b_config(), spec)}


def gpu(gigabytes: float, bf16: bool = True) -> hardware.Device:
    return hardware.Device("cuda", f"{gigabytes} GB", int(gigabytes * GB), bf16)


MACHINES = [gpu(8), gpu(12), gpu(24), gpu(80), hardware.Device("cpu", "64 GB host", 64 * GB, False)]
QUANT_BITS = {"4bit": 4, "8bit": 8, "none": 16}


def test_shapes_are_counted_from_the_config_without_weights(shapes):
    phi, llama = shapes["phi-2"], shapes["llama-7b"]
    assert phi.params == 2_779_683_840 and not phi.gated_mlp and phi.max_positions == 2048
    assert llama.params == 6_738_415_616 and llama.gated_mlp
    # LoRA r 16 on every linear layer of the decoder: r x (in + out) each.
    assert llama.lora_params == 32 * 16 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert llama.lora_modules_per_layer == 7 and phi.lora_modules_per_layer == 6


@pytest.mark.parametrize("model", ["phi-2", "llama-7b"])
def test_plans_on_described_machines_are_deterministic_monotonic_and_within_the_model(shapes, model):
    spec, shape = build_spec(AUTO), shapes[model]
    plans = [hardware.make_plan(spec, shape, device) for device in MACHINES[:4]]
    assert plans == [hardware.make_plan(spec, shape, device) for device in MACHINES[:4]]
    for plan in plans:
        assert plan.fits and plan.context_length <= shape.max_positions
        assert plan.predicted_peak_bytes + plan.overhead_bytes <= plan.budget_bytes
        assert plan.grad_accum * plan.micro_batch_size * plan.context_length in range(65536 // 2, 65536 * 2)
        # context, quantization, checkpointing, micro-batch, accumulation, compile, the peak
        assert len(plan.reasons) == 7
    # More memory never gives a shorter context, a heavier quantization or checkpointing it did without; and at the
    # same context, quantization and checkpointing, never a smaller micro-batch.
    for small, large in zip(plans, plans[1:]):
        assert large.context_length >= small.context_length
        if large.context_length == small.context_length:
            assert QUANT_BITS[large.quantization] >= QUANT_BITS[small.quantization]
            if large.quantization == small.quantization:
                assert large.gradient_checkpointing <= small.gradient_checkpointing
                if large.gradient_checkpointing == small.gradient_checkpointing:
                    assert large.micro_batch_size >= small.micro_batch_size
    assert plans[-1].quantization == "none" and not plans[-1].gradient_checkpointing  # 80 GB holds either in bf16


def test_a_7b_model_on_an_8gb_gpu_needs_4bit_and_a_gpu_without_bf16_gets_fp16(shapes):
    plan = hardware.make_plan(build_spec(AUTO), shapes["llama-7b"], gpu(8))
    assert plan.quantization == "4bit" and plan.gradient_checkpointing and plan.compute_dtype == "bfloat16"
    older = hardware.make_plan(build_spec(AUTO), shapes["llama-7b"], gpu(8, bf16=False))
    assert (older.mixed_precision, older.compute_dtype) == ("fp16", "float16")


def test_memory_is_sampled_finely_the_plan_never_shrinks(shapes):
    spec, shape = build_spec(AUTO), shapes["phi-2"]
    previous = None
    for gigabytes in range(6, 90, 3):
        plan = hardware.make_plan(spec, shape, gpu(gigabytes))
        if previous is not None:
            assert ((plan.context_length, QUANT_BITS[plan.quantization])
                    >= (previous.context_length, QUANT_BITS[previous.quantization]))
        previous = plan


def test_sharding_divides_the_weights_and_adapter_state_over_the_processes(shapes):
    """train.fsdp: each device holds 1/N of the weights, the adapter and its AdamW state, plus the layers gathered in
    flight and the root's weights (embeddings, head); the activations and logits are those of one process."""
    shape, setting = shapes["llama-7b"], hardware.Setting(4096, 1, True, "none")
    spec = build_spec({**AUTO, "train": {**AUTO["train"], "fsdp": True}})
    whole = hardware.estimate_memory(shape, setting, spec, "bf16", "cuda")
    for shards in (2, 8):
        part = hardware.estimate_memory(shape, setting, spec, "bf16", "cuda", shards)
        layer = (shape.params - shape.other_params) * 2 / shape.layers
        root = shape.other_params * 2
        assert part["weights"] == int(whole["weights"] / shards + 2 * layer + root * (shards - 1) / shards)
        assert part["trainable"] == whole["trainable"] // shards
        assert (part["activations"], part["logits"]) == (whole["activations"], whole["logits"])
    # 7B with 16-bit weights (13.5 GB) fits no 16 GB GPU alone, and fits each of 8 at 4096 tokens, sharded.
    alone = hardware.make_plan(build_spec({**AUTO, "quantization": {"mode": "none"}}), shape, gpu(16))
    sharded = hardware.make_plan(build_spec({**AUTO, "quantization": {"mode": "none"},
                                             "train": {**AUTO["train"], "fsdp": True}}), shape, gpu(16), processes=8)
    assert not alone.fits and sharded.fits and sharded.context_length == 4096
    assert any("sharded over 8 processes" in reason for reason in sharded.reasons)
    assert sharded.predicted_parts["weights"] < alone.predicted_parts["weights"] / 4
    # 8-bit weights cannot be sharded, nor fp16's gradient scaler used: both refused in one line.
    assert hardware.make_plan(build_spec({**AUTO, "train": {**AUTO["train"], "fsdp": True}}), shape, gpu(8),
                              processes=2).quantization == "4bit"
    with pytest.raises(SpecError, match="train.fsdp: 8-bit"):
        build_spec({**AUTO, "quantization": {"mode": "8bit"}, "train": {**AUTO["train"], "fsdp": True}})
    with pytest.raises(SpecError, match="train.fsdp: a sharded run trains in bf16"):
        hardware.make_plan(build_spec({**AUTO, "train": {**AUTO["train"], "fsdp": True}}), shape,
                           gpu(80, bf16=False), processes=2)


def test_a_resume_on_another_number_of_processes_keeps_the_global_batch(shapes):
    """A run planned for 2 processes, 2 sequences a micro-batch and 2 micro-batches each: 8 sequences a step. On 1
    process it accumulates 4, on 4 processes 1; 3 processes cannot share 8 sequences, refused in one line."""
    plan = hardware.make_plan(build_spec({**AUTO, "train": {"max_steps": 10, "micro_batch_size": 2, "grad_accum": 2}}),
                              shapes["phi-2"], gpu(80), processes=2)
    assert (plan.processes, plan.sequences_per_step) == (2, 8)
    assert [hardware.grad_accum_for(plan, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(SpecError, match=r"^train.grad_accum: this run takes 8 sequences a step \(2 a micro-batch x 2 x "
                                        r"2 process\(es\)\), which 3 processes cannot share; resume with 1, 2, 4 "):
        hardware.grad_accum_for(plan, 3)


def test_the_cpu_gets_4bit_not_8bit_and_full_precision(shapes):
    plan = hardware.make_plan(build_spec(AUTO), shapes["llama-7b"], MACHINES[-1])
    assert plan.mixed_precision == "no" and plan.quantization in ("none", "4bit") and plan.compute_dtype == "float32"


def test_precision_and_compile_follow_the_device_and_the_step_count(shapes):
    shape, cpu = shapes["phi-2"], MACHINES[-1]
    steps = lambda n, **train: build_spec({"train": {"max_steps": n, **train}})  # noqa: E731
    # A CPU without native bf16: full precision, and compiling never pays there.
    plan = hardware.make_plan(steps(100_000), shape, cpu)
    assert (plan.mixed_precision, plan.compile) == ("no", False) and "compile off" in plan.reasons[-2]
    # A CPU with AVX512-BF16 or AMX gets bf16 autocast, and with it compile once the run is long enough.
    bf16_cpu = hardware.Device("cpu", "AMX host", 64 * GB, True)
    assert hardware.make_plan(steps(100_000), shape, bf16_cpu).mixed_precision == "bf16"
    assert hardware.make_plan(steps(hardware.COMPILE_PAYS_FROM_STEPS), shape, bf16_cpu).compile is True
    assert hardware.make_plan(steps(hardware.COMPILE_PAYS_FROM_STEPS - 1), shape, gpu(80)).compile is False
    assert hardware.make_plan(steps(5000), shape, gpu(80)).compile is True
    assert hardware.make_plan(steps(5000, mixed_precision="no"), shape, cpu).compile is False
    assert hardware.make_plan(steps(10, compile=True), shape, cpu).compile is True  # what the spec says, it gets
    assert hardware.make_plan(steps(5000, compile=False), shape, gpu(80)).compile is False
    # With epochs the step count waits for the data: the loop decides (and config.json keeps it).
    assert hardware.make_plan(build_spec({"train": {"epochs": 1}}), shape, gpu(80)).compile is None
    # And here, on this machine:
    here = hardware.current_device()
    assert hardware.mixed_precision(steps(1)) == ("bf16" if here.bf16 else "fp16" if here.kind == "cuda" else "no")
    native = hardware.cpu_supports_bf16() if here.kind == "cpu" else torch.cuda.get_device_capability()[0] >= 8
    assert here.bf16 == native


def test_liger_is_for_cuda_and_never_compiled(shapes):
    shape = shapes["llama-7b"]
    liger = lambda **train: build_spec({"train": {"max_steps": 5000, "liger": True, **train}})  # noqa: E731
    with pytest.raises(SpecError, match="train.liger: Liger Kernel runs on CUDA GPUs only"):
        hardware.make_plan(liger(), shape, MACHINES[-1])
    assert hardware.make_plan(liger(), shape, gpu(80)).compile is False
    with pytest.raises(SpecError, match="train.compile: true cannot go with train.liger"):
        hardware.make_plan(liger(compile=True), shape, gpu(80))
    with pytest.raises(SpecError, match="lora.target_modules"):
        hardware.make_plan(build_spec({"train": {"max_steps": 1, "liger": True},
                                       "lora": {"target_modules": ["q_proj", "lm_head"]}}),
                           shape, gpu(80))


def test_an_explicit_context_past_the_models_positions_is_refused(shapes):
    spec = build_spec({"train": {"max_steps": 1}, "data": {"context_length": 4096}})
    with pytest.raises(SpecError, match="data.context_length: 4096 is more than the model's 2048 trained positions"):
        hardware.make_plan(spec, shapes["phi-2"], gpu(80))


def test_the_cap_and_a_short_model_limit_the_tiers(shapes):
    capped = build_spec({**AUTO, "data": {"context_length": "auto", "max_context_length": 1500}})
    assert hardware.make_plan(capped, shapes["llama-7b"], gpu(80)).context_length == 1024
    tiny = build_spec({**AUTO, "data": {"context_length": "auto", "max_context_length": 100}})
    assert hardware.make_plan(tiny, shapes["phi-2"], gpu(80)).context_length == 100


def test_nothing_fits_is_said_not_hidden(shapes):
    plan = hardware.make_plan(build_spec(AUTO), shapes["llama-7b"], gpu(2))
    assert not plan.fits and "does NOT fit" in plan.reasons[-1]


def test_accumulation_auto_needs_a_token_target():
    with pytest.raises(SpecError, match="train.grad_accum: auto needs train.tokens_per_step"):
        build_spec({"train": {"max_steps": 1, "grad_accum": "auto"}})


def test_sizes_parse():
    assert hardware.parse_bytes("24GiB") == 24 * 2**30 and hardware.parse_bytes("80 GB") == 80 * GB
    assert hardware.parse_bytes("512MiB") == 2**29 and hardware.parse_bytes("1000") == 1000
    for bad in ("", "lots", "-3GB", "3XB"):
        with pytest.raises(ValueError):
            hardware.parse_bytes(bad)


def saved_activation_bytes(config, spec, context: int, micro_batch: int, mixed: bool) -> int:
    """What autograd keeps for the backward pass of one real forward, counted with saved-tensor hooks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if mixed:
        model = model.to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=spec.lora.r, target_modules="all-linear", lora_dropout=spec.lora.dropout,
                                             task_type="CAUSAL_LM"))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    model.train()
    ids = torch.randint(0, config.vocab_size, (micro_batch, context))
    positions = torch.arange(context).repeat(micro_batch, 1)
    positions[:, context // 3:] -= context // 3  # two packed files a sequence
    saved = {}

    def keep(tensor):
        base = tensor._base if tensor._base is not None else tensor
        saved[id(base)] = base
        return tensor

    parameters = {id(p) for p in model.parameters()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast:
        logits = model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    return sum(t.untyped_storage().nbytes() for key, t in saved.items() if key not in parameters)


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16 autocast"])
def test_the_activation_estimate_matches_what_autograd_keeps(mixed):
    """At a shape the coefficients were not measured on (other widths, rank, dropout, context), within 10%."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=384, hidden_size=192, intermediate_size=448, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=512)
    spec = build_spec({"train": {"max_steps": 1}, "lora": {"r": 12, "dropout": 0.1}})
    shape = hardware.model_shape(config, spec)
    context, micro_batch = 96, 3
    measured = saved_activation_bytes(config, spec, context, micro_batch, mixed)
    parts = hardware.estimate_memory(shape, hardware.Setting(context, micro_batch, False, "none"), spec,
                                     "bf16" if mixed else "no", "cpu")
    # The estimate's logits part holds the peak of the loss's backward pass; what is kept from the forward is 4 bytes a
    # logit.
    predicted = parts["activations"] + context * micro_batch * shape.vocab * 4
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_job_plan_prints_the_choice_and_its_reasons(tmp_path, capsys):
    from job.cli import main

    spec = write_spec(tmp_path / "job.yaml", {**AUTO, "data": {"context_length": "auto", "repo": str(tmp_path)}})
    result = run_job("plan", "--spec", str(spec), "--gpu-memory", "24GiB")
    assert result.returncode == 0, result.stderr
    assert "data.context_length:    2048" in result.stdout and "why:" in result.stdout
    assert "cuda described GPU (24GiB)" in result.stdout
    assert main(["plan", "--spec", str(spec), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"]["kind"] == "cpu" and plan["fits"] and plan["micro_batch_size"] >= 1
    assert main(["plan", "--spec", str(spec), "--gpu-memory", "lots"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --gpu-memory: 'lots' is not a size "
                                               "(examples: 24GiB, 80GB, 512MiB)")
