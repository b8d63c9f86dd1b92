"""Optimizers and the learning-rate schedule (plain PyTorch).

`optim.name=adamw`: AdamW on every parameter, weight decay on the matrices only.
`optim.name=muon`: `torch.optim.Muon` on the hidden matrices (the attention and MLP weights inside the
blocks), AdamW on the rest (embedding, head, norms, biases), each with its own learning rate and
schedule. Lightning's automatic optimization takes one optimizer, so the two are driven as one
`MultiOptimizer`.

Parameters are told apart by NAME, not by shape: under FSDP the optimizer sees flat 1-D shards.

The schedule is linear warm-up then cosine decay to a floor, per parameter group, as a pure function of
the optimizer step and the config (`apply_schedule`, called before every step): nothing of it comes from a
checkpoint, so a resumed run follows the config it is given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lingmao.checks import check_fields, choice, number
from lingmao.compat import muon_lr, orthogonalize  # copies of torch's private Muon functions
from lingmao.errors import LingmaoError

OPTIMIZERS = ("adamw", "muon")
# Strategies that hand the optimizer flat shards of the parameters instead of whole matrices. (hardware=fsdp
# is FSDP2, whose parameters keep their shapes: Muon gathers each matrix, see `orthogonalize_whole`.)
SHARDING_STRATEGIES = ("deepspeed",)


@dataclass
class MuonConfig:
    """Muon on the hidden matrices (`optim.name=muon`); null warm-up/floor: the same as AdamW's."""

    KEY: ClassVar[str] = "optim.muon"
    lr: float = number(0.02, gt=0)
    momentum: float = number(0.95, ge=0, lt=1)
    nesterov: bool = True
    ns_steps: int = number(5, ge=1, le=99)  # Newton-Schulz iterations per step
    weight_decay: float = number(0.0, ge=0)  # decoupled: each step multiplies the weights by 1 - lr * weight_decay
    adjust_lr: str = choice("original", "original", "match_rms_adamw")  # torch's adjust_lr_fn
    warmup_steps: int | None = number(None, ge=0)
    min_lr_ratio: float | None = number(None, ge=0, le=1)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class OptimConfig:
    """AdamW (or Muon + AdamW), warm-up then cosine decay, clipping and accumulation."""

    KEY: ClassVar[str] = "optim"
    name: str = choice("adamw", *OPTIMIZERS)
    lr: float = number(1.0e-3, gt=0)  # AdamW's learning rate (with muon: of the embedding, head and norms)
    weight_decay: float = number(0.1, ge=0)  # AdamW's, on matrices only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = number(1.0e-8, gt=0)
    warmup_steps: int = number(100, ge=0)  # optimizer steps
    min_lr_ratio: float = number(0.1, ge=0, le=1)  # the cosine floor, as a fraction of the peak
    max_grad_norm: float | None = number(1.0, gt=0)  # gradient clipping over all groups (null = off)
    accumulation_steps: int = number(1, ge=1)  # batches per optimizer step
    fused: bool | None = None  # fused AdamW kernel on CUDA (null = torch's choice; fused with model.compile=true)
    muon: MuonConfig = field(default_factory=MuonConfig)

    def __post_init__(self) -> None:
        if isinstance(self.muon, dict):  # from a plain dict (a checkpoint's hyperparameters)
            self.muon = MuonConfig(**self.muon)
        check_fields(self)
        betas = list(self.betas)
        if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
            raise LingmaoError(f"optim.betas={betas}: allowed: a list of two numbers in [0, 1), e.g. [0.9, 0.95]")


def check_strategy(cfg: OptimConfig, strategy: str) -> None:
    """Muon orthogonalises whole 2-D matrices; a sharding strategy other than hardware=fsdp gives it flat 1-D
    pieces of them."""
    if cfg.name == "muon" and any(s in str(strategy).lower() for s in SHARDING_STRATEGIES):
        raise LingmaoError(
            f"optim.name=muon does not work with hardware.strategy={strategy}: it shards the weight matrices into "
            "flat 1-D pieces and Muon needs whole matrices; use hardware=fsdp, optim=adamw, or strategy ddp"
        )


# ----------------------------------------------------------------------------------------------
# Which parameter goes where
# ----------------------------------------------------------------------------------------------
_IN_BLOCK = re.compile(r"(^|\.)(blocks|layers)\.\d+\.")


def no_decay(name: str) -> bool:
    """Biases and norm gains: no weight decay."""
    return name.endswith("bias") or "norm" in name


def hidden_matrix(name: str) -> bool:
    """A weight matrix inside a Transformer block (attention or MLP): what Muon optimizes."""
    return bool(_IN_BLOCK.search(name)) and name.endswith("weight") and not no_decay(name)


@dataclass
class ParameterSplit:
    hidden: list[nn.Parameter]  # Muon's (empty for adamw)
    decay: list[nn.Parameter]  # AdamW with weight decay
    no_decay: list[nn.Parameter]  # AdamW without


def split_parameters(named: Iterable[tuple[str, nn.Parameter]], muon: bool) -> ParameterSplit:
    """Sort trainable parameters by name (shared tensors appear once in `named_parameters()`)."""
    split = ParameterSplit([], [], [])
    for name, p in named:
        if not p.requires_grad:
            continue
        if muon and hidden_matrix(name):
            if p.dim() != 2:
                raise LingmaoError(
                    f"optim.name=muon: parameter {name} has shape {tuple(p.shape)}, not a whole matrix "
                    "(a sharded model?); use optim=adamw"
                )
            split.hidden.append(p)
        else:
            (split.no_decay if no_decay(name) else split.decay).append(p)
    return split


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------
class MultiOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, driven as one.

    `param_groups` are the inner optimizers' own group dicts, in order, so an LR scheduler, gradient
    clipping and LR monitors reach every group; `state` is one dict shared with the inner optimizers, so
    the standard `state_dict()` / `load_state_dict()` save and restore all of them.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        super().__init__([group for opt in self.optimizers for group in opt.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point each inner optimizer at its slice of our groups and at our state."""
        first = 0
        for opt in self.optimizers:
            count = len(opt.param_groups)
            opt.param_groups = self.param_groups[first : first + count]
            opt.state = self.state
            first += count

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces our groups and state with new objects
        self._share()


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a `DTensor` (a parameter sharded by FSDP2)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def orthogonalize_whole(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                        dtype: torch.dtype, fn: Callable[..., torch.Tensor] = orthogonalize) -> torch.Tensor:
    """`orthogonalize` (or `fn`, its compiled form) of the whole matrix, also when `g` holds only this rank's rows
    of it (an FSDP2 `DTensor`): every rank gathers the matrix, orthogonalizes it and keeps its own rows of the
    result, which are those a single process computes. Costs one all-gather of each matrix per step."""
    if not is_dtensor(g):
        return fn(g, steps, coefficients, eps, dtype)
    from torch.distributed.tensor import distribute_tensor

    whole = fn(g.full_tensor(), steps, coefficients, eps, dtype)
    return distribute_tensor(whole, g.device_mesh, g.placements, src_data_rank=None)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon`, with the Newton-Schulz iteration in `ns_dtype` (torch's private step functions,
    copied in `lingmao.compat`).

    torch runs it in bfloat16, which suits GPUs; a CPU without bfloat16 matrix units multiplies bfloat16
    several times slower than float32 (on a 2-core AVX2 machine: 2.2 against 13.8 GFLOP/s, and 15.8 s for
    one step of model=small's hidden matrices against 0.54 s in float32). `ns_dtype=None` keeps torch's own
    step on CUDA and uses float32 elsewhere. The update and the state (`momentum_buffer`) are torch's, so
    checkpoints are interchangeable. Parameters sharded by FSDP2 are orthogonalized whole
    (`orthogonalize_whole`; on CUDA in bfloat16, as torch does).
    """

    def __init__(self, params: Any, ns_dtype: torch.dtype | None = None, compile: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        # compile=True: the Newton-Schulz iteration compiled (one graph per matrix shape), in the step below
        self._orthogonalize = torch.compile(orthogonalize, dynamic=False) if compile else orthogonalize

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"]]
        cuda = bool(params) and params[0].is_cuda
        sharded = any(is_dtensor(p) for p in params)
        if self.ns_dtype is None and cuda and not sharded and self._orthogonalize is orthogonalize:
            return super().step(closure)
        ns_dtype = self.ns_dtype or (torch.bfloat16 if cuda else torch.float32)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize_whole(update, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                             ns_dtype, self._orthogonalize)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-muon_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig, compile: bool = False) -> torch.optim.Optimizer:
    """AdamW, or Muon + AdamW as one `MultiOptimizer`; each group is named ("decay", "no_decay", "muon").

    The AdamW groups come first, so `param_groups[0]["lr"]` is AdamW's learning rate in both cases.
    `compile=True` (model.compile): the update in as few kernels as the device allows: AdamW fused on CUDA
    (unless `optim.fused` says otherwise), Muon's Newton-Schulz iteration compiled.
    """
    split = split_parameters(model.named_parameters(), muon=cfg.name == "muon")
    groups = [
        {"params": params, "weight_decay": wd, "name": name}
        for name, params, wd in (("decay", split.decay, cfg.weight_decay), ("no_decay", split.no_decay, 0.0))
        if params
    ]
    fused = cfg.fused if cfg.fused is not None or not compile else True
    adamw = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        fused=fused if torch.cuda.is_available() else None,
    )
    if cfg.name == "adamw":
        return adamw
    m = cfg.muon
    muon = Muon(
        [{"params": split.hidden, "name": "muon"}], lr=m.lr, weight_decay=m.weight_decay, momentum=m.momentum,
        nesterov=m.nesterov, ns_steps=m.ns_steps, adjust_lr_fn=m.adjust_lr, compile=compile,
    )
    return MultiOptimizer([adamw, muon])


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def warmup_cosine(step: int, warmup_steps: int, total_steps: float, min_lr_ratio: float,
                  progress: float | None = None) -> float:
    """LR multiplier after `step` optimizer steps: linear warm-up to 1, then cosine down to `min_lr_ratio`.

    The cosine runs from the end of the warm-up to the end of the run: by steps of `total_steps`, or, when
    given, by `progress` (0..1 of the run, e.g. measured in epochs), and holds its floor after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if progress is None:
        progress = step / total_steps if total_steps > 0 else 1.0
    start = warmup_steps / total_steps if total_steps > 0 else 0.0
    q = min(1.0, max(0.0, (progress - start) / (1.0 - start))) if start < 1 else 1.0
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * q))


def group_schedule(cfg: OptimConfig, group: dict[str, Any]) -> tuple[float, int, float]:
    """(peak learning rate, warm-up steps, floor ratio) of a parameter group: Muon's group follows
    `optim.muon.*` (its null warm-up and floor: AdamW's), every other group `optim.*`."""
    if group.get("name") == "muon":
        m = cfg.muon
        return (m.lr, cfg.warmup_steps if m.warmup_steps is None else m.warmup_steps,
                cfg.min_lr_ratio if m.min_lr_ratio is None else m.min_lr_ratio)
    return cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio


def apply_schedule(optimizer: torch.optim.Optimizer, schedules: list[tuple[float, int, float]], step: int,
                   total_steps: float, progress: float | None = None, warmup_cap: int | None = None,
                   scale: float = 1.0) -> None:
    """Set every group's learning rate for optimizer step `step`: its own (peak, warm-up, floor) from
    `schedules` (`group_schedule` of each group, in order), warm-up capped at `warmup_cap`, times `scale`.

    Only the config decides: whatever rate a group carries (e.g. from a checkpoint's optimizer state) is
    overwritten, so a resumed run follows the schedule its own command describes.
    """
    for group, (peak, warmup, floor) in zip(optimizer.param_groups, schedules, strict=False):
        warmup = warmup if warmup_cap is None else min(warmup, warmup_cap)
        group["lr"] = peak * warmup_cosine(step, warmup, total_steps, floor, progress) * scale
