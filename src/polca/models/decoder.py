"""A small causal decoder in one readable file (nanoGPT-shaped).

Every operation is written so that forward-mode automatic differentiation is exact, including
second directional derivatives (jvp of jvp):

* LayerNorm is built from primitives: ``F.layer_norm`` gives a wrong second directional
  derivative under jvp-of-jvp on torch 2.13 (pytorch#196700).
* Attention is an explicit masked softmax (or, for the loss-plateau tasks, linear attention
  with no softmax): ``F.scaled_dot_product_attention`` has no forward-mode AD on the fused
  CPU kernels.

Example:
    >>> cfg = DecoderConfig(vocab_size=14, context_length=12, n_layers=2, d_model=32, n_heads=2)
    >>> model = Decoder(cfg)
    >>> model(torch.zeros(3, 12, dtype=torch.long)).shape
    torch.Size([3, 12, 14])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class DecoderConfig:
    vocab_size: int
    context_length: int
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int | None = None  # default 4 * d_model
    tied_head: bool = False
    attention: Literal["softmax", "linear"] = "softmax"
    layer_norm_eps: float = 1e-5

    @property
    def mlp_width(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of ``x [..., d]`` over its last dimension from primitives, exact under
    forward-over-forward AD (``F.layer_norm`` is not, pytorch#196700); ``weight``/``bias``
    ``[d]`` are optional.

    >>> x = torch.randn(3, 5, dtype=torch.float64)
    >>> torch.allclose(layer_norm(x), F.layer_norm(x, (5,)))
    True
    """
    centred = x - x.mean(dim=-1, keepdim=True)
    variance = (centred * centred).mean(dim=-1, keepdim=True)
    out = centred / torch.sqrt(variance + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


class LayerNorm(nn.Module):
    """LayerNorm from primitives, exact under forward-over-forward AD (:func:`layer_norm`)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.linear = cfg.attention == "linear"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        mask = torch.tril(torch.ones(cfg.context_length, cfg.context_length, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)

    def attention_pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[batch, heads, query, key]`` (for progress measures)."""
        q, k, _ = self._heads(x)
        return self._pattern(q, k)

    def _heads(self, x: torch.Tensor):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        shape = (batch, length, self.n_heads, width // self.n_heads)
        return (t.view(shape).transpose(1, 2) for t in (q, k, v))

    def _pattern(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        length = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        mask = self.causal_mask[:length, :length]
        if self.linear:
            # linear attention: causal weights without normalisation (loss-plateau paper)
            return scores * mask
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self._heads(x)
        mixed = self._pattern(q, k) @ v
        return self.out(mixed.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.ln_attn = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.mlp_in = nn.Linear(cfg.d_model, cfg.mlp_width)
        self.mlp_out = nn.Linear(cfg.mlp_width, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x))))


class Decoder(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, final LayerNorm, linear head."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_head:
            self.head.weight = self.token_embedding.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Residual stream after the embedding and after each block, each ``[batch, seq, d]``."""
        length = input_ids.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"sequence length {length} exceeds context {self.cfg.context_length}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return states

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for ``input_ids [batch, seq]``."""
        return self.head(self.ln_final(self.hidden_states(input_ids)[-1]))

    def jet_engine(self, loss):
        """This decoder's Taylor-mode pass for ``loss`` (:func:`polca.models.jet.token_loss_jet`
        with ``loss`` bound), or None unless ``loss`` is exactly the computation the pass
        reproduces: :class:`~polca.functional.ModuleTokenLoss` of this decoder with next-token
        cross-entropy, built of this file's modules (subclasses may compute something else).
        :mod:`polca.directional` asks a token loss's module for this method; any module may
        offer one.

        >>> from polca.functional import ModuleTokenLoss
        >>> model = Decoder(DecoderConfig(vocab_size=5, context_length=4, d_model=4, n_heads=1))
        >>> model.jet_engine(ModuleTokenLoss(model)) is None
        False
        >>> model.jet_engine(ModuleTokenLoss(model, loss_fn=lambda logits, batch: logits))
        """
        from functools import partial

        from polca.functional import ModuleTokenLoss, next_token_losses
        from polca.models import jet

        exact = (type(loss) is ModuleTokenLoss and loss.module is self
                 and loss.loss_fn is next_token_losses and type(self) is Decoder
                 and type(self.ln_final) is LayerNorm
                 and all(type(b) is Block and type(b.attn) is CausalSelfAttention
                         and type(b.ln_attn) is LayerNorm and type(b.ln_mlp) is LayerNorm
                         for b in self.blocks))
        return partial(jet.token_loss_jet, loss) if exact else None
