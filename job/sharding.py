"""train.fsdp: the model sharded over the processes with FSDP2 (torch's fully_shard), and its tensors moved whole
in and out of their shards for checkpoints and adapters."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from job.spec import SpecError


def shard(peft_model) -> None:
    """fully_shard every decoder layer (its frozen weights and its adapter together), then the transformers model as
    the root: generate() calls that model, not the peft wrapper, so a root on the wrapper would never gather."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        # One process started without a launcher (job run): FSDP2 still needs a process group, of one.
        dist.init_process_group("nccl" if next(peft_model.parameters()).is_cuda else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    causal_lm = peft_model.get_base_model()
    layer_classes = set(getattr(causal_lm, "_no_split_modules", None) or [])
    layers = [module for module in causal_lm.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise SpecError([f"train.fsdp: {type(causal_lm).__name__} names no decoder layer class (_no_split_modules) "
                         "to shard by; train it unsharded"])
    for layer in layers:
        fully_shard(layer)
    fully_shard(causal_lm)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (every process must call it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as the parameter is: on its device, in its dtype, and sharded as it is."""
    value = value.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


def optimizer_state(optimizer) -> dict:
    """The optimizer's state_dict with its moments gathered whole (every process must call it): the layout of an
    unsharded run's, so that a checkpoint loads on any number of processes."""
    saved = optimizer.state_dict()
    state = {index: {key: whole(value).cpu() if isinstance(value, DTensor) else value for key, value in values.items()}
             for index, values in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def load_optimizer_state(optimizer, saved: dict) -> None:
    """optimizer_state's result put back, each moment into this process's shard of it."""
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                    state[key] = like(param, value)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's weights gathered whole on the host of the main process (every process must call it), for peft's
    save_pretrained."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
