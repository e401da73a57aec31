"""Second-order Taylor-mode ("jet") propagation through the built-in decoder, m directions at once.

Along θ(t) = θ + t·v every activation a becomes a function a(t); its *jet* is the value a(0),
the first derivative a'(0) and the second derivative a''(0). A network maps jets to jets
primitive by primitive (a linear layer y = W h gives y' = W h' + W' h and
y'' = W h'' + 2 W' h', because W'' = 0), so one pass yields both directional derivatives of
every token's loss, ⟨v, ∇ℓ_x⟩ = ℓ_x'(0) and vᵀ∇²ℓ_x v = ℓ_x''(0), for all m directions in
batched matrix products: about (1 + 4m) forward passes of arithmetic for both orders and
(1 + 2m) for the first alone, against about 10 m for m nested ``jvp`` calls.

Only what the scored tokens' losses depend on is computed: sequences are cut after their last
scored position (attention is causal), the last block's queries, MLP and the head run only at
scored columns, and logits exist only at scored tokens.

The propagation mirrors :class:`polca.models.decoder.Decoder` operation by operation (same
primal arithmetic, so the same token losses); :meth:`Decoder.jet_engine
<polca.models.decoder.Decoder.jet_engine>` says whether a token loss is that decoder with
next-token cross-entropy (this module imports no model: the decoder imports it). Anything else goes through the generic engines of
:mod:`polca.directional`.

Example:
    >>> from polca.models.decoder import Decoder, DecoderConfig
    >>> from polca.functional import ModuleTokenLoss, ProbeBatch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = Decoder(DecoderConfig(vocab_size=12, context_length=12, d_model=8, n_heads=2))
    >>> loss = ModuleTokenLoss(model.double())
    >>> theta = loss.space.flatten(dict(model.named_parameters())).detach()
    >>> ids = torch.randint(0, 12, (3, 12))
    >>> scored = torch.zeros(3, 12, dtype=torch.bool); scored[:, -5:-1] = True
    >>> batch = ProbeBatch(ids, torch.roll(ids, -1, 1), scored)
    >>> V = torch.randn(2, loss.space.dim, dtype=torch.float64)
    >>> jet = token_loss_jet(loss, theta, V, batch, order=2)
    >>> jet.value.shape, jet.first.shape, jet.second.shape      # [tokens], [m, tokens] twice
    (torch.Size([12]), torch.Size([2, 12]), torch.Size([2, 12]))
    >>> torch.allclose(jet.value, loss(theta, batch))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from polca.functional import ModuleTokenLoss, ProbeBatch

# (value [*shape], tangent [m, *shape] or None for a parameter held fixed)
Param = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass
class Jet:
    """An activation and its first and second derivatives along m directions.

    ``value [*shape]``, ``first [m, *shape]``, ``second [m, *shape]`` (``None`` when only the
    first order is propagated).
    """

    value: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor | None

    def __add__(self, other: Jet) -> Jet:
        second = None if self.second is None else self.second + other.second
        return Jet(self.value + other.value, self.first + other.first, second)

    def map(self, fn) -> Jet:
        """The jet of ``fn(a)`` for a linear ``fn`` acting on trailing dimensions only
        (indexing, reshaping, scaling, masking): ``fn`` applied to all three parts."""
        return Jet(fn(self.value), fn(self.first),
                   None if self.second is None else fn(self.second))


def token_loss_jet(
    loss: ModuleTokenLoss, theta: torch.Tensor, tangents: torch.Tensor, batch: ProbeBatch,
    order: int = 2,
) -> Jet:
    """Token losses and their first (and second) derivatives along every row of ``tangents``.

    Args:
        loss: a token loss for which ``Decoder.jet_engine`` offers this pass.
        theta: ``[d]`` parameters (the arithmetic is done in its dtype).
        tangents: ``[m, d]`` directions (one chunk: memory grows with m × sequences).
        batch: probe sequences (one chunk).
        order: 1 (``second`` is None) or 2.

    Returns:
        a :class:`Jet` of the ``[tokens]`` losses in the row-major order of ``batch.scored``:
        ``value`` ℓ_x(θ), ``first [m, tokens]`` ⟨v, ∇ℓ_x⟩, ``second [m, tokens]`` vᵀ∇²ℓ_x v.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    module = loss.module  # the built-in Decoder
    m = tangents.shape[0]
    if batch.input_ids.shape[1] > module.cfg.context_length:
        raise ValueError(f"sequence length {batch.input_ids.shape[1]} exceeds context "
                         f"{module.cfg.context_length}")
    used = batch.scored.any(0).nonzero()[:, 0]
    if len(used) == 0:
        return Jet(theta.new_zeros(0), theta.new_zeros(m, 0),
                   theta.new_zeros(m, 0) if order == 2 else None)
    # attention is causal: positions after the last scored one change no scored loss
    length = int(used[-1]) + 1
    ids, scored = batch.input_ids[:, :length], batch.scored[:, :length]
    params = _parameters(loss, theta, tangents)
    second_order = order == 2

    x = _embedding(params["token_embedding.weight"], ids, m, second_order)
    x = x + _embedding(params["position_embedding.weight"],
                       torch.arange(length, device=ids.device)[None], m, second_order)
    for i, block in enumerate(module.blocks):
        last = i == len(module.blocks) - 1
        # the last block is needed only at the scored columns (its keys and values everywhere)
        x = _block(x, params, f"blocks.{i}.", block, used if last else None)
    if len(module.blocks) == 0:
        x = x.map(lambda t: t[..., used, :])
    x = _layer_norm(x, params, "ln_final.", module.ln_final.eps)
    keep = scored[:, used]
    x = x.map(lambda t: t[..., keep, :])  # [tokens, d_model] and [m, tokens, d_model]
    head = "token_embedding.weight" if module.cfg.tied_head else "head.weight"
    return _cross_entropy(_linear(x, params[head]), batch.targets[:, :length][scored])


# parameters -------------------------------------------------------------------------------------
def _parameters(loss: ModuleTokenLoss, theta: torch.Tensor, tangents: torch.Tensor) -> dict:
    """name -> (value, tangent ``[m, *shape]``, or None for a parameter outside θ)."""
    space = loss.space
    params: dict[str, Param] = {
        name: (value.to(device=theta.device, dtype=theta.dtype), None)
        for name, value in loss.fixed.items()
    }
    values = space.unflatten(theta)
    m = tangents.shape[0]
    for name, shape in zip(space.names, space.shapes):
        params[name] = (values[name], tangents[:, space.slices[name]].view(m, *shape))
    return params


def _broadcast(tangent: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``[m, *shape]`` parameter tangent viewed to broadcast against ``[m, ..., *shape]``
    activation derivatives with ``ndim`` dimensions."""
    extra = ndim - tangent.ndim
    return tangent.view(tangent.shape[0], *([1] * extra), *tangent.shape[1:])


# primitives (each mirrors the decoder's operation on the value) ---------------------------------
def _embedding(table: Param, ids: torch.Tensor, m: int, second_order: bool) -> Jet:
    value, tangent = table
    out = F.embedding(ids, value)
    if tangent is None:
        first = out.new_zeros(m, *out.shape)
    else:
        first = tangent[:, ids]
    # a lookup is linear in the table, and the table is linear in t: no second derivative
    return Jet(out, first, torch.zeros_like(first) if second_order else None)


def _linear(x: Jet, weight: Param, bias: Param | None = None) -> Jet:
    """``y = x Wᵀ + b``: y' = x' Wᵀ + x W'ᵀ + b', y'' = x'' Wᵀ + 2 x' W'ᵀ."""
    w, dw = weight
    b, db = bias if bias is not None else (None, None)
    value = F.linear(x.value, w, b)
    m, out_features = x.first.shape[0], w.shape[0]
    shape = (m, *x.value.shape[:-1], out_features)
    first = F.linear(x.first, w).view(m, -1, out_features)
    second = None if x.second is None else F.linear(x.second, w).view(m, -1, out_features)
    if dw is not None:
        # x W'ᵀ for every direction: one batched product accumulated into x' Wᵀ
        rows = x.value.reshape(1, -1, x.value.shape[-1]).expand(m, -1, -1)
        first = first.baddbmm_(rows, dw.transpose(1, 2))
        if second is not None:
            second = second.baddbmm_(x.first.reshape(m, -1, x.first.shape[-1]),
                                     dw.transpose(1, 2), alpha=2)
    if db is not None:
        first = first.add_(db[:, None, :])
    return Jet(value, first.view(shape), None if second is None else second.view(shape))


def _layer_norm(x: Jet, params: dict, prefix: str, eps: float) -> Jet:
    """The decoder's primitive LayerNorm ``c / sqrt(var + eps) * w + b``, ``c = x − mean x``.

    With s = (var + eps)^(-1/2), n = c s, u = s c' and u₂ = s c'' (c' = x' − mean x'),
    r = mean(n u), r₂ = mean(n u₂), q = mean(u²):
    n' = u − r n and n'' = u₂ − 2 r u + (3 r² − q − r₂) n.
    """
    w, dw = params[prefix + "weight"]
    b, db = params[prefix + "bias"]
    centred = x.value - x.value.mean(dim=-1, keepdim=True)
    variance = (centred * centred).mean(dim=-1, keepdim=True)
    normed = centred / torch.sqrt(variance + eps)
    value = normed * w + b
    s = torch.rsqrt(variance + eps)
    u = (x.first - x.first.mean(dim=-1, keepdim=True)).mul_(s)
    r = (normed * u).mean(dim=-1, keepdim=True)
    n1 = torch.addcmul(u, normed, r, value=-1)
    second = None
    if x.second is not None:
        u2 = (x.second - x.second.mean(dim=-1, keepdim=True)).mul_(s)
        r2 = (normed * u2).mean(dim=-1, keepdim=True)
        q = (u * u).mean(dim=-1, keepdim=True)
        n2 = u2.addcmul_(u, r, value=-2).addcmul_(normed, 3 * r * r - q - r2)
        second = n2.mul_(w)
        if dw is not None:
            second = second.addcmul_(n1, _broadcast(dw, n1.ndim), value=2)
    first = n1.mul_(w) if second is None else n1 * w
    if dw is not None:
        first = first.addcmul_(normed, _broadcast(dw, first.ndim))
    if db is not None:
        first = first.add_(_broadcast(db, first.ndim))
    return Jet(value, first, second)


def _gelu(x: Jet) -> Jet:
    """Exact GELU g(x) = x Φ(x): g' = Φ + x φ, g'' = φ (2 − x²)."""
    value = F.gelu(x.value)
    pdf = torch.exp(-0.5 * x.value * x.value) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x.value / math.sqrt(2)))
    slope = cdf + x.value * pdf
    first = slope * x.first
    second = None
    if x.second is not None:
        curvature = pdf * (2 - x.value * x.value)
        second = torch.addcmul(slope * x.second, curvature * x.first, x.first)
    return Jet(value, first, second)


def _product(a: Jet, b: Jet) -> Jet:
    """Batched matrix product ``a @ b`` of two jets: (ab)' = a'b + ab', (ab)'' = a''b + 2a'b' + ab''."""
    value = a.value @ b.value
    first = a.first @ b.value + a.value @ b.first
    second = None
    if a.second is not None:
        second = a.second @ b.value + 2 * (a.first @ b.first) + a.value @ b.second
    return Jet(value, first, second)


def _attention(x: Jet, params: dict, prefix: str, attn: torch.nn.Module,
               queries: torch.Tensor | None) -> Jet:
    """Causal self-attention of ``x [batch, seq, width]``; outputs at ``queries`` (all positions
    when None)."""
    length, width = x.value.shape[-2:]
    heads = attn.n_heads
    qkv = _linear(x, params[prefix + "qkv.weight"], params[prefix + "qkv.bias"])

    def split(t: torch.Tensor, part: int) -> torch.Tensor:  # [..., seq, 3w] -> [..., heads, seq, dh]
        piece = t[..., part * width:(part + 1) * width]
        return piece.unflatten(-1, (heads, width // heads)).transpose(-3, -2)

    q, k, v = (qkv.map(lambda t, part=part: split(t, part)) for part in range(3))
    rows = torch.arange(length, device=x.value.device) if queries is None else queries
    if queries is not None:
        q = q.map(lambda t: t[..., queries, :])
    scale = math.sqrt(width // heads)
    scores = _product(q, k.map(lambda t: t.transpose(-2, -1))).map(lambda t: t / scale)
    mask = torch.arange(length, device=rows.device)[None, :] <= rows[:, None]  # [query, key]
    if attn.linear:
        pattern = scores.map(lambda t: t * mask)
    else:
        pattern = _softmax(scores, mask)
    mixed = _product(pattern, v)  # [..., heads, query, dh]
    mixed = mixed.map(lambda t: t.transpose(-3, -2).flatten(-2))
    return _linear(mixed, params[prefix + "out.weight"], params[prefix + "out.bias"])


def _softmax(scores: Jet, mask: torch.Tensor) -> Jet:
    """Masked softmax over the last axis: p' = p ⊙ a with a = s' − ⟨p, s'⟩, and
    p'' = p' ⊙ a + p ⊙ (s'' − ⟨p, s''⟩ − ⟨p', s'⟩)."""
    p = torch.softmax(scores.value.masked_fill(~mask, float("-inf")), dim=-1)
    a = scores.first - (p * scores.first).sum(-1, keepdim=True)
    first = p * a
    second = None
    if scores.second is not None:
        inner = (p * scores.second).sum(-1, keepdim=True) + (first * scores.first).sum(
            -1, keepdim=True)
        second = first * a + p * (scores.second - inner)
    return Jet(p, first, second)


def _block(x: Jet, params: dict, prefix: str, block: torch.nn.Module,
           queries: torch.Tensor | None) -> Jet:
    """Pre-LN block ``x + attn(ln(x))`` then ``x + mlp_out(gelu(mlp_in(ln(x))))``."""
    attended = _attention(_layer_norm(x, params, prefix + "ln_attn.", block.ln_attn.eps),
                          params, prefix + "attn.", block.attn, queries)
    if queries is not None:
        x = x.map(lambda t: t[..., queries, :])
    x = x + attended
    hidden = _layer_norm(x, params, prefix + "ln_mlp.", block.ln_mlp.eps)
    hidden = _gelu(_linear(hidden, params[prefix + "mlp_in.weight"], params[prefix + "mlp_in.bias"]))
    return x + _linear(hidden, params[prefix + "mlp_out.weight"], params[prefix + "mlp_out.bias"])


def _cross_entropy(logits: Jet, targets: torch.Tensor) -> Jet:
    """ℓ = logsumexp(z) − z_target: ℓ' = ⟨p, z'⟩ − z'_target,
    ℓ'' = ⟨p, z''⟩ + ⟨p, z'²⟩ − ⟨p, z'⟩² − z''_target."""
    z = logits.value
    value = -torch.log_softmax(z, dim=-1).gather(-1, targets[:, None])[:, 0]
    p = torch.softmax(z, dim=-1)
    index = targets[None, :, None].expand(logits.first.shape[0], -1, 1)
    mean_first = (p * logits.first).sum(-1)
    first = mean_first - logits.first.gather(-1, index)[..., 0]
    second = None
    if logits.second is not None:
        second = ((p * logits.second).sum(-1) + (p * logits.first * logits.first).sum(-1)
                  - mean_first * mean_first - logits.second.gather(-1, index)[..., 0])
    return Jet(value, first, second)
