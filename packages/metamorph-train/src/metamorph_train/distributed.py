"""PyTorch's own distributed engines for the trainer: DDP, and FSDP2 (``fully_shard``) with
either sharded state dicts (each rank its shards, for sharded checkpoints) or full ones
gathered onto rank 0. Start processes with ``torchrun``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("ddp", "fsdp")


def wrap(
    model: Any, strategy: str, units: list[Any] | None = None, device: str | None = None
) -> Any:
    """The module the training loop calls. ``fsdp`` shards each of ``units`` (transformer
    blocks), then the rest."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown distributed strategy '{strategy}'; use {' or '.join(STRATEGIES)}"
        )
    if strategy == "ddp":
        return DistributedDataParallel(model)
    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise ValueError(
            "train.strategy=fsdp cannot shard 4-bit (bitsandbytes) base weights; train QLoRA "
            "(objective.lora.quantize) with train.strategy=ddp, whose every rank holds the "
            "4-bit base whole"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the mesh follows the training device (fully_shard would otherwise pick CUDA whenever it
    # exists, even for a model on the CPU)
    kind = torch.device(device).type if device else next(model.parameters()).device.type
    if kind == "cuda" and device is not None and torch.device(device).index is not None:
        # NCCL's object collectives (the sharded checkpoints' DCP plans) run on the current
        # device: each rank's own, not cuda:0 for all
        torch.cuda.set_device(torch.device(device))
    mesh = init_device_mesh(kind, (dist.get_world_size(),))
    for unit in units or []:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def no_sync(wrapped: Any, strategy: str) -> Any:
    """A context that skips the gradient all-reduce for a micro-batch."""
    if strategy == "ddp":
        return wrapped.no_sync()
    return _FsdpNoSync(wrapped)


class _FsdpNoSync:
    def __init__(self, module: Any) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc: Any) -> None:
        self.module.set_requires_gradient_sync(True)


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_weights(model: Any, names: list[str], strategy: str | None) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of ``names``; under FSDP a collective every rank must call,
    whose result is complete on rank 0 (the rank that writes checkpoints)."""
    if strategy != "fsdp":
        params = dict(model.named_parameters())
        return {n: params[n].detach() for n in names}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    if dist.get_rank() != 0:  # with cpu_offload the full tensors land on rank 0 only
        return {}
    return {n: state[n] for n in names}


def load_weights(model: Any, weights: dict[str, torch.Tensor], strategy: str | None) -> None:
    if strategy != "fsdp":
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))


def full_optimizer_state(model: Any, optimizer: Any, strategy: str | None) -> dict[str, Any]:
    if strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(
    model: Any, optimizer: Any, state: dict[str, Any], strategy: str | None
) -> None:
    if strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def sharded_weights(model: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of parameters ``names`` as this rank holds them, without copies: under
    FSDP2 DTensors whose local part is this rank's shard, otherwise the detached parameters.
    They share storage with the model, so loading into them (``dcp.load``) loads the model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model)
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(f"the model's state dict lacks parameters {missing[:5]}")
    return {n: state[n] for n in names}


def set_sharded_weights(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (as :func:`sharded_weights` returns them) into ``model``'s parameters;
    a no-op in effect when they were loaded in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))


def sharded_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """``optimizer``'s state keyed by parameter names, tensors as this rank holds them (under
    FSDP2 DTensor shards; the optimizer's own tensors, not copies). An optimizer that has not
    stepped yet gets its state made first (a step with zero gradients and learning rate 0), so
    the result is a template to load a checkpoint into."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def set_sharded_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """The inverse of :func:`sharded_optimizer_state` (param groups included)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state)


def all_reduce_sum(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP2-sharded ``model``, gathered onto rank 0's CPU (a
    collective every rank calls; other ranks get ``{}``). Load it into an unsharded copy to
    save with code written for whole models (peft's ``save_pretrained`` cannot save shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    return state if dist.get_rank() == 0 else {}


def is_meta(model: Any) -> bool:
    return any(p.is_meta for p in model.parameters())


def materialise_from_rank0(
    model: Any, whole: dict[str, torch.Tensor] | None, device: str | torch.device
) -> None:
    """After ``fully_shard``: ranks that built ``model`` on the meta device allocate their
    shards, and every rank receives rank 0's weights (``whole``, its full state dict) into
    them. Buffers outside the state dict (rotary frequencies) are broadcast from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if is_meta(model):
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole if dist.get_rank() == 0 else {}, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
