"""FSDP: Lightning's `ModelParallelStrategy` with FSDP2's `fully_shard`, one unit per Transformer block.

Why not Lightning's `FSDPStrategy`: it drives FSDP1, which hands the optimizer flat 1-D pieces of the weight
matrices (Muon, the default optimizer, needs whole matrices), and Lightning refuses it on CPU processes. FSDP2
keeps every parameter a `DTensor` of its own shape, sharded by rows, so Muon can gather whole matrices
(`lingmao.optim.Muon`), and it runs on CPU processes over gloo, where the tests run it.

`FSDP` adds to Lightning's strategy what a run of lingmao needs:

- `shard(model)`: `fully_shard` on every block, then on the whole model (embedding, final norm and head);
  activation checkpointing per block (`torch.utils.checkpoint`); `hardware.fsdp.sharding_strategy` chooses
  between resharding after the forward (FULL_SHARD) or not (SHARD_GRAD_OP), and sharding within a machine while
  replicating across machines (HYBRID_SHARD);
- checkpoints written whole or not at all: a sharded checkpoint (a directory, one file per rank) is written
  under a temporary name and renamed into place (`lingmao.checkpointing.replace_checkpoint`); a full one is
  one file written by rank 0 (`AtomicCheckpointIO`);
- full checkpoint files loaded without running code, and the optimizer state of a checkpoint written by
  another strategy (DDP, one process) matched to the parameters by the optimizer's own groups;
- `full_model(model)`: the whole weights gathered into a plain model on rank 0 (export and samples).
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.checkpoint import checkpoint

from lingmao.checkpointing import (
    checkpoint_progress,
    load_checkpoint_file,
    replace_checkpoint,
    staging_path,
)
from lingmao.errors import LingmaoError
from lingmao.hardware import FSDPConfig
from lingmao.optim import is_dtensor

log = logging.getLogger(__name__)


def processes_per_node(devices: Any, accelerator: str) -> int:
    """How many processes `hardware.devices` starts on each machine (Lightning's reading of it)."""
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and "," in devices:  # "0,1": those devices; "1,": device 1 alone
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if accelerator == "cuda":  # "auto" or -1: every GPU
        return max(1, torch.cuda.device_count())
    return 1


class FSDP(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with lingmao's sharding plan and checkpoint handling (see the module docstring).

    `processes`: processes per machine, `num_nodes`: machines. The device mesh has one dimension of all ranks
    (HYBRID_SHARD: machines x processes, replicated across machines, sharded within each).
    """

    def __init__(self, config: FSDPConfig, block_types: Iterable[type[nn.Module]], processes: int,
                 num_nodes: int = 1, process_group_backend: str | None = None) -> None:
        hybrid = config.sharding_strategy == "HYBRID_SHARD"
        # Lightning names the mesh's two dimensions data_parallel x tensor_parallel; lingmao uses them as
        # (all ranks) x 1, or for HYBRID_SHARD as (machines: replicate) x (processes: shard).
        super().__init__(
            data_parallel_size=num_nodes if hybrid else num_nodes * processes,
            tensor_parallel_size=processes if hybrid else 1,
            save_distributed_checkpoint=config.state_dict_type == "sharded",
            process_group_backend=process_group_backend,
        )
        self.config = config
        self.block_types = tuple(block_types)

    # -- the model ------------------------------------------------------------------------------
    def shard(self, model: nn.Module) -> None:
        """Apply the sharding plan to `model` (LingmaoLM.configure_model calls this once)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        if is_sharded(model):
            return  # sharded already (a second fit / validate / test on the same module)
        hybrid = self.config.sharding_strategy == "HYBRID_SHARD"
        mesh = self.device_mesh if hybrid else self.device_mesh["data_parallel"]
        offload = CPUOffloadPolicy() if self.config.cpu_offload and self.root_device.type == "cuda" else OffloadPolicy()
        options = {"mesh": mesh, "offload_policy": offload,
                   "reshard_after_forward": self.config.sharding_strategy != "SHARD_GRAD_OP"}
        blocks = [m for m in model.modules() if isinstance(m, self.block_types)]
        for block in blocks:
            if self.config.activation_checkpointing:
                checkpoint_activations(block)
            fully_shard(block, **options)
        fully_shard(model, **options)
        log.info("FSDP: %d blocks and the root sharded over %s ranks (%s%s)", len(blocks), mesh.size(),
                 self.config.sharding_strategy, ", activation checkpointing" if self.config.activation_checkpointing
                 else "")

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path,
                        storage_options: Any | None = None) -> None:
        """A sharded checkpoint (a directory) is written beside its place and renamed into it, so a kill at any
        moment leaves the previous checkpoint whole; a full one is one file written atomically by rank 0."""
        path = Path(self.broadcast(str(filepath)))
        if self.config.state_dict_type != "sharded" and not path.is_dir():
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        progress = checkpoint_progress(checkpoint)
        staging = Path(self.broadcast(str(staging_path(path, secrets.token_hex(4)))))
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.is_global_zero:
            replace_checkpoint(staging, path)
            saved = getattr(self.checkpoint_io, "saved", None)
            if saved is not None:
                saved.pop(str(staging.resolve()), None)
                saved[str(path.resolve())] = progress
        self.barrier()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        return self._load_full_checkpoint(path)

    def _load_full_checkpoint(self, path: Path) -> dict[str, Any]:
        """A one-file checkpoint (of this strategy, DDP or one process) into the sharded model and optimizer."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        assert self.model is not None
        ckpt = load_checkpoint_file(path)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, ckpt.pop("state_dict"), options=options)
        for optimizer, state in zip(self.optimizers, ckpt.pop("optimizer_states", []), strict=False):
            set_optimizer_state_dict(self.model, optimizer, named_optimizer_state(state, optimizer, self.model),
                                     options=options)
        return ckpt


def named_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                          module: nn.Module) -> dict[str, Any]:
    """`optimizer.state_dict()`-style `state` (parameters numbered) keyed by parameter names instead, as
    `set_optimizer_state_dict` takes it.

    The numbers are matched to parameters through the groups (the i-th number of a saved group is the i-th
    parameter of that group now), as `Optimizer.load_state_dict` does, so any consistent numbering works:
    a plain optimizer's (group order) or an FSDP full checkpoint's (the model's order).
    """
    keys = list(state.get("state", {}))
    if not keys or not isinstance(keys[0], int):
        return state  # keyed by name already
    names = {id(p): n for n, p in module.named_parameters()}
    saved_groups, groups = state["param_groups"], optimizer.param_groups
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
        raise LingmaoError("the checkpoint's optimizer has other parameter groups than this run's (optim.name?)")
    number_to_name = {
        number: names[id(p)]
        for saved, group in zip(saved_groups, groups, strict=True)
        for number, p in zip(saved["params"], group["params"], strict=True)
    }
    return {
        "state": {number_to_name[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [number_to_name[k] for k in g["params"]]} for g in saved_groups],
    }


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute `block`'s activations in the backward pass instead of keeping them (`torch.utils.checkpoint`).

    The block's own `forward` is wrapped, so its parameter names and FSDP's hooks (which run around the call)
    stay as they are; FSDP has the parameters gathered again when the recomputation runs inside the backward.
    """
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def full_model(model: nn.Module) -> nn.Module | None:
    """A plain copy of a sharded `model` with its whole weights on global rank 0, None on the other ranks (every
    rank must call it: the weights are gathered); an unsharded `model` itself."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lingmao.model import build_model

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = build_model(model.config, model.vocab_size)
    plain.load_state_dict(weights)
    return plain.eval()
