"""The language models: plain PyTorch, usable without Lightning or Hydra.

One `ModelConfig` describes both architectures; `build_model(config, vocab_size)` makes either.

- `GPT` (`arch: gpt`, the default): a decoder as today's small-GPT speedruns build it. Token embedding,
  rotary positions (RoPE) on queries and keys, RMSNorm before each sub-layer, RMSNorm on queries and keys
  (QK-norm), causal attention through `F.scaled_dot_product_attention(is_causal=True)`, a ReLU² or SwiGLU
  MLP, output projections initialised to zero (every block starts as the identity), no biases, a final
  RMSNorm and a tied or untied head. It decodes incrementally with a `KVCache`.
- `SimpleTransformer` (`arch: design`): the original design, a stack of `nn.TransformerEncoderLayer`
  (pre- or post-LayerNorm) with sinusoidal positions, made causal. Its attention is handed to
  `scaled_dot_product_attention(is_causal=True)` too: the mask is passed together with `is_causal=True`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lingmao import compat
from lingmao.checks import check_fields, choice, number
from lingmao.errors import LingmaoError

ARCHS = ("gpt", "design")
ACTIVATIONS: dict[str, tuple[str, ...]] = {"gpt": ("relu2", "swiglu", "gelu"), "design": ("gelu", "relu")}
DEFAULT_ACTIVATION = {"gpt": "relu2", "design": "gelu"}

# Named sizes (conf/model/*.yaml): d_model, nhead, num_layers, dim_feedforward.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "nhead": 2, "num_layers": 2, "dim_feedforward": 256},
    "small": {"d_model": 256, "nhead": 4, "num_layers": 4, "dim_feedforward": 1024},
    "base": {"d_model": 768, "nhead": 12, "num_layers": 12, "dim_feedforward": 3072},
    "large": {"d_model": 1024, "nhead": 16, "num_layers": 16, "dim_feedforward": 4096},
}


@dataclass
class ModelConfig:
    """Every model key; the defaults are the `small` size of the gpt architecture."""

    KEY: ClassVar[str] = "model"
    name: str = "small"  # the size's name, as a label
    arch: str = choice("gpt", *ARCHS)  # gpt: the modern decoder; design: SimpleTransformer
    d_model: int = number(256, ge=1)
    nhead: int = number(4, ge=1)
    num_layers: int = number(4, ge=1)
    dim_feedforward: int = number(1024, ge=1)  # hidden width of the MLP (SwiGLU: of each of its two inputs)
    dropout: float = number(0.0, ge=0, lt=1)
    max_len: int = number(1024, ge=1)  # longest sequence: the rotary (gpt) or sinusoidal (design) table
    tie_weights: bool = False  # share the embedding and output-head weights
    norm_first: bool = True  # design only: pre-LayerNorm blocks (gpt is always pre-norm)
    activation: str | None = choice(None, "relu2", "swiglu", "gelu", "relu")  # null: relu2 (gpt), gelu (design)
    rope_base: float = number(10000.0, gt=0)  # gpt only: base of the rotary frequencies
    qk_norm: bool = True  # gpt only: RMSNorm on queries and keys
    compile: bool = False  # torch.compile the training step: forward + loss (+ backward), and the optimizer's update

    def __post_init__(self) -> None:
        check_fields(self)
        if self.d_model % self.nhead:
            allowed = ""
            if self.d_model <= 4096:
                heads = ", ".join(str(h) for h in range(1, self.d_model + 1) if self.d_model % h == 0)
                allowed = f"; allowed nhead: {heads}"
            raise LingmaoError(f"model.d_model={self.d_model} is not divisible by model.nhead={self.nhead}{allowed}")
        if self.activation is None:
            self.activation = DEFAULT_ACTIVATION[self.arch]
        if self.activation not in ACTIVATIONS[self.arch]:
            raise LingmaoError(
                f"model.activation={self.activation} does not apply to model.arch={self.arch}; "
                f"allowed: {', '.join(ACTIVATIONS[self.arch])}"
            )
        if self.arch == "gpt":
            head_dim = self.d_model // self.nhead
            if head_dim % 2:
                raise LingmaoError(
                    f"model.d_model={self.d_model} / model.nhead={self.nhead} gives heads of {head_dim} dimensions; "
                    "rotary positions (model.arch=gpt) need an even number"
                )
            if not self.norm_first:
                raise LingmaoError("model.norm_first=false applies to model.arch=design only (gpt is always pre-norm)")

    @classmethod
    def of_size(cls, name: str, **overrides: Any) -> ModelConfig:
        """The config of a named size (tiny, small, base, large), with `overrides` on top."""
        if name not in SIZES:
            raise LingmaoError(f"model.name={name}: not a known size; allowed: {', '.join(SIZES)}")
        return cls(**{"name": name, **SIZES[name], **overrides})


def build_model(config: ModelConfig, vocab_size: int) -> nn.Module:
    """The model `config` describes, for a vocabulary of `vocab_size` tokens."""
    return MODEL_CLASSES[config.arch](config, vocab_size)


def train_flops_per_token(config: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token: 6 N + 12 L T d (PaLM, appendix B).

    N counts the weights that take part in matrix multiplies: per layer the four attention projections
    (4 d^2) and the MLP's matrices (2 d f; SwiGLU has three: 3 d f), plus the output head (d V), tied or
    not; not the embedding lookup, norms or biases. 12 L T d is attention itself (QK^T and AV).
    """
    d, f, layers = config.d_model, config.dim_feedforward, config.num_layers
    mlp_matrices = 3 if config.activation == "swiglu" else 2
    n = layers * (4 * d * d + mlp_matrices * d * f) + d * vocab_size
    return 6 * n + 12 * layers * seq_len * d


def _count_parameters(model: nn.Module, embedding: nn.Embedding, non_embedding: bool) -> int:
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # shared tensors once
    return n - embedding.weight.numel() if non_embedding else n


# ----------------------------------------------------------------------------------------------
# GPT: the modern decoder
# ----------------------------------------------------------------------------------------------
def rope_tables(max_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, [max_len, head_dim / 2]: position t turns pair i by t * base^(-2i/hd)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, time, head_dim] by its positions' angles (cos, sin: [time, head_dim / 2]).

    Pairs are (x[i], x[i + hd/2]) (the GPT-NeoX layout). Queries and keys rotated this way have dot
    products that depend on their distance only.
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of the tokens decoded so far, per layer: [batch, heads, capacity, head_dim] buffers,
    allocated once.

    `GPT.forward(idx, cache=...)` appends the keys and values of `idx` and attends over everything cached; all
    rows then hold the same number of tokens (`length`). `DecodeStep` instead advances each row at a position of
    its own, which its caller keeps; `rows` gives a cache of some rows (the same buffers) for a `forward` of
    those rows alone.
    """

    def __init__(self, num_layers: int, batch_size: int, nhead: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch_size, nhead, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0  # tokens cached (the position of the next one)

    def clear(self) -> None:
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s keys and values of the new tokens; return those of all tokens so far."""
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    @property
    def batch_size(self) -> int:
        return self.keys[0].size(0) if self.keys else 0

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) of this cache as a cache of their own: the same memory, an empty `length`."""
        view = copy.copy(self)
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view.length = 0
        return view

    def move_rows(self, start: int, stop: int, to: int) -> None:
        """Copy rows [start, stop) to rows [to, to + stop - start) (the ranges may overlap)."""
        for buffers in (self.keys, self.values):
            for b in buffers:
                b[to : to + stop - start] = b[start:stop].clone()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.nhead, self.head_dim = config.nhead, d // config.nhead
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.nhead, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # One new token attends to every cached one; more than one (a whole sequence or a prefill) causally.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=t > 1
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f = config.d_model, config.dim_feedforward
        self.activation = config.activation
        self.fc = nn.Linear(d, f, bias=False)
        self.gate = nn.Linear(d, f, bias=False) if config.activation == "swiglu" else None
        self.proj = nn.Linear(f, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.gate is not None:
            h = F.silu(self.gate(x)) * h
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only Transformer with rotary positions, RMSNorm and QK-norm (see the module docstring)."""

    block_class: ClassVar[type[nn.Module]] = Block  # the unit FSDP wraps

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config, self.vocab_size, self.max_len = config, vocab_size, config.max_len
        self.embedding = nn.Embedding(vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, vocab_size, bias=False)
        self._decode_step: tuple[tuple[tuple[int, int], ...], DecodeStep] | None = None  # see decode_step
        cos, sin = rope_tables(config.max_len, config.d_model // config.nhead, config.rope_base)
        # Not persistent: pure functions of the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()
        if config.tie_weights:
            self.head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for block in self.blocks:  # each block starts as the identity
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: [batch, time] token ids -> logits [batch, time, vocab].

        With a `cache`, idx continues the cached tokens (a whole prompt into an empty cache, then one
        token at a time) and only the last position's logits are computed: [batch, 1, vocab].
        """
        t = idx.size(1)
        start = cache.length if cache is not None else 0
        if start + t > self.max_len:
            raise ValueError(f"sequence of {start + t} tokens is longer than the rotary table ({self.max_len})")
        if cache is not None:
            if start and t != 1:
                raise ValueError("a cache that holds tokens takes one new token at a time")
            if start + t > cache.capacity:
                raise ValueError(f"the cache holds {cache.capacity} tokens; {start + t} do not fit")
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        x = self.dropout(self.embedding(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += t
            x = x[:, -1:]
        return self.head(self.norm(x))

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty `KVCache` for `batch_size` sequences of up to `capacity` tokens (default: max_len)."""
        weight = self.embedding.weight
        return KVCache(
            len(self.blocks), batch_size, self.config.nhead, self.config.d_model // self.config.nhead,
            min(capacity or self.max_len, self.max_len), weight.device, weight.dtype,
        )

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors counted once); optionally without the token embedding."""
        return _count_parameters(self, self.embedding, non_embedding)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token at context `seq_len` (see `train_flops_per_token`)."""
        return train_flops_per_token(self.config, self.vocab_size, seq_len)

    def decode_step(self) -> DecodeStep:
        """A `DecodeStep` with this model's weights as they are now: the one made before while no parameter has
        changed since (a step copies every matrix: 14-18 ms for model=small on a CPU, a tenth of the time a 五律
        takes to decode), a new one otherwise. In-place operations on a parameter, `load_state_dict` and
        replaced tensors are seen; writes through `.data` are not (torch does not count them): after those,
        `train()` or `to()` lets the kept step go."""
        state = compat.parameters_state(self)
        if state is not None and self._decode_step is not None and self._decode_step[0] == state:
            return self._decode_step[1]
        step = DecodeStep(self)
        self._decode_step = (state, step) if state is not None else None
        return step

    def train(self, mode: bool = True) -> GPT:
        if mode:  # weights about to change: the copy of them a kept decoding step holds is let go
            self._decode_step = None
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> GPT:
        self._decode_step = None  # .to(), .half(), .cpu(), ...: the kept step holds copies of the old tensors
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_decode_step": None}  # copies and pickles of the model do not carry it


def _rows_times(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ w [in, out], computed with at least two rows (see `DecodeStep`)."""
    if x.size(0) == 1:
        return (x.expand(2, -1) @ w)[:1]
    return x @ w


class DecodeStep:
    """The next token's logits for each of several sequences at once, each at a position of its own: the
    decoding step of a `GPT`, with the arithmetic of every row independent of the other rows.

    `step(tokens [B], positions [B], cache)` takes row i's newest token, stores its keys and values at
    `positions[i]` in row i of `cache` (whose rows 0..B-1 hold what each sequence has cached) and returns
    logits [B, vocab]. Row i of the result depends on row i's token, position and cache only, bit for bit: every
    operation is row-wise (embedding, RMSNorm, rotary positions, attention over the row's own cache at its full
    capacity, positions past the row's masked), and the matrix products are `x @ W` with W laid out [in, out]
    and at least two rows. A CPU BLAS computes one row (a matrix-vector product) with another kernel than
    several rows, and rounds differently, and for W laid out [out, in] (`F.linear`) it changes kernels with the
    number of rows; in this layout, from two rows up, each row comes out the same whatever the others
    (tests/test_batching.py checks it on the machine it runs on). So a sequence decoded beside others gets
    exactly the logits it gets alone.

    The weights are copied at construction, transposed, and q, k and v fused into one [d, 3d] matrix (one
    product instead of three; the model keeps its three, so exports and checkpoints are unchanged; `fuse_qkv=False`
    keeps three, for comparison). That is one more copy of the model's matrices in memory. A model trained further
    needs a new DecodeStep.
    """

    def __init__(self, model: GPT, fuse_qkv: bool = True) -> None:
        def t(w: torch.Tensor) -> torch.Tensor:
            return w.detach().t().contiguous()

        def norm(m: nn.Module) -> tuple[torch.Tensor, float | None]:
            return m.weight.detach(), m.eps

        config = model.config
        h, hd = config.nhead, config.d_model // config.nhead
        self.nhead, self.head_dim, self.d_model = h, hd, config.d_model
        self.activation = config.activation
        self.layers = []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            # Queries and keys are normalised together, each head with its weights; the queries' carry the
            # attention's 1/sqrt(hd).
            if config.qk_norm:
                qk_weight = torch.cat([attn.q_norm.weight.detach().expand(h, hd) * hd**-0.5,
                                       attn.k_norm.weight.detach().expand(h, hd)])
            else:
                qk_weight = torch.cat([torch.full((h, hd), hd**-0.5), torch.ones(h, hd)]).to(attn.q.weight)
            self.layers.append({
                "attn_norm": norm(block.attn_norm), "qk_weight": qk_weight,
                "qkv": [t(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))] if fuse_qkv
                else [t(attn.q.weight), t(attn.k.weight), t(attn.v.weight)],
                "proj": t(attn.proj.weight),
                "mlp_norm": norm(block.mlp_norm), "fc": t(mlp.fc.weight),
                "gate": t(mlp.gate.weight) if mlp.gate is not None else None, "down": t(mlp.proj.weight),
            })
        self.qk_norm = config.qk_norm
        self.embedding = model.embedding.weight.detach()
        self.norm = norm(model.norm)
        self.head = t(model.head.weight)
        # Rotary positions as x * cos + rotate(x) * sin, rotate(x) = (x2, x1): the same products and sums as
        # `apply_rope`, in fewer operations.
        cos, sin = model.rope_cos, model.rope_sin
        self.cos, self.sin = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
        self._slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # by (rows, capacity)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        b, h, hd, d = tokens.size(0), self.nhead, self.head_dim, self.d_model
        half = hd // 2
        x = F.embedding(tokens, self.embedding)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [B, 1, hd]
        known = self._slots.get((b, cache.capacity))
        if known is None:  # where (row, head) begins in a layer's cache viewed as [B * heads * capacity, hd]
            known = (torch.arange(b * h, device=tokens.device).view(b, h) * cache.capacity,
                     torch.arange(cache.capacity, device=tokens.device))
            self._slots[b, cache.capacity] = known
        first, places = known
        slots = (first + positions.unsqueeze(1)).view(-1)  # where each row's new key and value go
        later = (places > positions.unsqueeze(1))[:, None, None, :]  # [B, 1, 1, capacity]: not yet written, or stale
        for i, layer in enumerate(self.layers):
            hidden = _rms(x, layer["attn_norm"])
            qkv = torch.cat([_rows_times(hidden, w) for w in layer["qkv"]], -1) if len(layer["qkv"]) > 1 \
                else _rows_times(hidden, layer["qkv"][0])
            qk, v = qkv[:, : 2 * d].view(b, 2 * h, hd), qkv[:, 2 * d :].reshape(b * h, hd)
            if self.qk_norm:
                qk = F.rms_norm(qk, (hd,))
            qk = qk * layer["qk_weight"]
            qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), -1) * sin
            q, k = qk[:, :h].unsqueeze(2), qk[:, h:].reshape(b * h, hd)  # q [B, heads, 1, hd]
            keys, values = cache.keys[i][:b], cache.values[i][:b]
            keys.view(-1, hd).index_copy_(0, slots, k if k.dtype == keys.dtype else k.to(keys.dtype))
            values.view(-1, hd).index_copy_(0, slots, v if v.dtype == values.dtype else v.to(values.dtype))
            scores = (q @ keys.transpose(-1, -2)).masked_fill_(later, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ values  # [B, heads, 1, hd]
            x = x + _rows_times(y.view(b, d), layer["proj"])
            hidden = _rms(x, layer["mlp_norm"])
            up = _rows_times(hidden, layer["fc"])
            if layer["gate"] is not None:
                up = F.silu(_rows_times(hidden, layer["gate"])) * up
            elif self.activation == "relu2":
                up = F.relu(up).square()
            else:
                up = F.gelu(up)
            x = x + _rows_times(up, layer["down"])
        return _rows_times(_rms(x, self.norm), self.head)


def _rms(x: torch.Tensor, norm: tuple[torch.Tensor, float | None]) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), norm[0], norm[1])


# ----------------------------------------------------------------------------------------------
# SimpleTransformer: the original design
# ----------------------------------------------------------------------------------------------
class PositionalEncoding(nn.Module):
    """Fixed sinusoidal positions (Vaswani et al.), added to the embeddings, then dropout."""

    def __init__(self, d_model: int, max_len: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.max_len = max_len
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
        # Not persistent: it is a pure function of (max_len, d_model), so checkpoints need not carry it.
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, time, d_model]."""
        return self.dropout(x + self.pe[: x.size(1)].to(x.dtype))


class SimpleTransformer(nn.Module):
    """Decoder-only (causal) Transformer language model of the original design."""

    block_class: ClassVar[type[nn.Module]] = nn.TransformerEncoderLayer  # the unit FSDP wraps

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config, self.vocab_size, self.max_len = config, vocab_size, config.max_len
        self.d_model = d_model = config.d_model
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.pos_encoder = PositionalEncoding(d_model, config.max_len, config.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model,
            config.nhead,
            config.dim_feedforward,
            config.dropout,
            activation=config.activation,
            batch_first=True,
            norm_first=config.norm_first,
        )
        # enable_nested_tensor only matters with padding masks, which a causal LM does not use.
        self.transformer = nn.TransformerEncoder(
            layer, config.num_layers, norm=nn.LayerNorm(d_model) if config.norm_first else None,
            enable_nested_tensor=False,
        )
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()
        if config.tie_weights:
            self.head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @staticmethod
    def causal_mask(size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Float mask with -inf above the diagonal (what `is_causal=True` stands for)."""
        return nn.Transformer.generate_square_subsequent_mask(size, device=device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: [batch, time] token ids -> logits [batch, time, vocab]."""
        t = idx.size(1)
        if t > self.max_len:
            raise ValueError(f"sequence of {t} tokens is longer than the positional table ({self.max_len})")
        x = self.pos_encoder(self.embedding(idx) * math.sqrt(self.d_model))
        x = self.transformer(x, mask=self.causal_mask(t, idx.device), is_causal=True)
        return self.head(x)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors counted once); optionally without the token embedding."""
        return _count_parameters(self, self.embedding, non_embedding)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token at context `seq_len` (see `train_flops_per_token`)."""
        return train_flops_per_token(self.config, self.vocab_size, seq_len)


MODEL_CLASSES: dict[str, type[nn.Module]] = {"gpt": GPT, "design": SimpleTransformer}  # by model.arch
