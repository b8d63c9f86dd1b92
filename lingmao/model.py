"""The language model itself: plain PyTorch, usable without Lightning or Hydra.

`SimpleTransformer` keeps the shape of the original design (scaled token embedding, sinusoidal
positions, a stack of `nn.TransformerEncoderLayer`, a linear head) but is *causal*: the logits at
position t depend only on tokens 0..t. The mask is passed together with `is_causal=True`, so
PyTorch hands attention to `scaled_dot_product_attention(is_causal=True)` (the fused kernels)
instead of adding a dense float mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lingmao.checks import check_fields, choice, number
from lingmao.errors import LingmaoError


@dataclass
class ModelConfig:
    """Every model key, with the `small` size as defaults (conf/model/*.yaml choose other sizes)."""

    KEY: ClassVar[str] = "model"
    name: str = "small"
    d_model: int = number(256, ge=1)
    nhead: int = number(4, ge=1)
    num_layers: int = number(4, ge=1)
    dim_feedforward: int = number(1024, ge=1)
    dropout: float = number(0.1, ge=0, lt=1)
    max_len: int = number(1024, ge=1)  # longest sequence (size of the positional table)
    tie_weights: bool = True  # share the embedding and output-head weights
    norm_first: bool = True  # pre-LayerNorm blocks
    activation: str = choice("gelu", "gelu", "relu")
    compile: bool = False  # torch.compile the model's forward

    def __post_init__(self) -> None:
        check_fields(self)
        if self.d_model % self.nhead:
            allowed = ""
            if self.d_model <= 4096:
                heads = ", ".join(str(h) for h in range(1, self.d_model + 1) if self.d_model % h == 0)
                allowed = f"; allowed nhead: {heads}"
            raise LingmaoError(
                f"model.d_model={self.d_model} is not divisible by model.nhead={self.nhead}{allowed}"
            )


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
    """Decoder-only (causal) Transformer language model."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 256,
        nhead: int = 4,
        num_layers: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        max_len: int = 1024,
        tie_weights: bool = True,
        norm_first: bool = True,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.pos_encoder = PositionalEncoding(d_model, max_len, dropout)
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation=activation,
            batch_first=True,
            norm_first=norm_first,
        )
        # enable_nested_tensor only matters with padding masks, which a causal LM does not use.
        self.transformer = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(d_model) if norm_first else None, enable_nested_tensor=False
        )
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()
        if tie_weights:
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

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, 6 N + 12 L T d (PaLM, appendix B); N: the weights in matrix multiplies."""
        layers = self.transformer.layers
        d, ff = self.d_model, layers[0].linear1.out_features
        n = len(layers) * (4 * d * d + 2 * d * ff) + d * self.vocab_size
        return 6 * n + 12 * len(layers) * seq_len * d

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors counted once); optionally without the token embedding."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if non_embedding:
            n -= self.embedding.weight.numel()
        return n


def build_model(config: ModelConfig, vocab_size: int) -> SimpleTransformer:
    """The model a config describes, for a vocabulary of `vocab_size` tokens."""
    return SimpleTransformer(
        vocab_size, d_model=config.d_model, nhead=config.nhead, num_layers=config.num_layers,
        dim_feedforward=config.dim_feedforward, dropout=config.dropout, max_len=config.max_len,
        tie_weights=config.tie_weights, norm_first=config.norm_first, activation=config.activation,
    )
