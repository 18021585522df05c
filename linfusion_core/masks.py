"""Attention masks for LinFusion's linear attention.

A *key-padding* mask (one that only says which keys each batch element, and possibly each head, may see,
the same for every query) runs linear attention over the kept keys alone: masked keys leave phi(k)^T v and
the sum of phi(k), and the normalisation counts only the kept keys. Per sample and head, with K the kept keys,

    out = phi(q) (sum_K phi(k)^T v / n) / (phi(q) . sum_K phi(k) / n + eps),    n = |K|

(attention.py's formula with its N, the token count, replaced by the kept-key count. In general, for M keys and
N queries, the phi(k)^T v sum is divided by N * n / M, which is n for self-attention, and a mask that keeps every
key gives exactly the unmasked result.)
A batch element or head that keeps no key gets zeros, as ComfyUI's softmax attention (PyTorch's
scaled_dot_product_attention) gives for a fully masked row.

Masks come in the forms ComfyUI's attention functions take (``attention_pytorch``): boolean (True = attend) or
additive float (0 = attend, -inf or a large negative = masked), broadcastable to (batch, heads, queries, keys)
after ComfyUI's own padding: (keys,), (queries, keys), (batch, queries, keys), (batch, heads, queries, keys),
each query or head dimension possibly 1. A 2-D mask whose first dimension is the batch size (and neither 1
nor the query count) is read as (batch, keys), the way ComfyUI's ``attention_basic`` reads boolean masks.
Anything else (a mask that differs across queries, other additive values, other dtypes or shapes) is not a
key-padding mask: ``key_padding_keep`` says why, and the layer runs the base softmax attention instead.
"""
from __future__ import annotations

import logging

import torch

from .attention import linear_attention

__all__ = ["DROP_AT_OR_BELOW", "key_padding_keep", "masked_linear_attention", "warn_fallback_once"]

log = logging.getLogger("LinFusion")

# Additive mask values at or below this drop a key (-inf, torch.finfo(dtype).min, diffusers' -10000):
# softmax gives such keys a weight of exactly 0 in fp32. Values between this and 0 only down-weight a key,
# which linear attention cannot express.
DROP_AT_OR_BELOW = -1e4


def key_padding_keep(mask: torch.Tensor, batch: int, heads: int, queries: int, keys: int):
    """``(keep, None)`` with ``keep`` a bool tensor (1 or batch, 1 or heads, keys), True = attend; or
    ``(None, reason)`` when ``mask`` is not a key-padding mask of this attention call."""
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        keep = mask == 0
        if not bool((keep | (mask <= DROP_AT_OR_BELOW)).all()):
            return None, (f"the additive mask has values other than 0 and -inf (or <= {DROP_AT_OR_BELOW:g}), "
                          "so it weights keys instead of dropping them")
    else:
        return None, f"the mask's dtype {mask.dtype} is neither bool nor floating point"

    shape = tuple(mask.shape)
    if keep.dim() == 1:
        keep = keep.view(1, 1, 1, -1)
    elif keep.dim() == 2:
        if keep.shape[0] == batch and keep.shape[0] not in (1, queries):
            keep = keep.view(batch, 1, 1, -1)  # (batch, keys)
        else:
            keep = keep.view(1, 1, *keep.shape)  # (queries, keys), as attention_pytorch pads it
    elif keep.dim() == 3:
        keep = keep.unsqueeze(1)  # (batch, queries, keys)
    elif keep.dim() != 4:
        return None, f"the mask has {keep.dim()} dimensions {shape}"
    b, h, n, m = keep.shape
    if m != keys or b not in (1, batch) or h not in (1, heads) or n not in (1, queries):
        return None, (f"the mask's shape {shape} does not broadcast to (batch {batch}, heads {heads}, "
                      f"queries {queries}, keys {keys})")
    if n > 1 and not bool((keep == keep[:, :, :1]).all()):
        return None, f"the mask {shape} differs between queries (not a key-padding mask)"
    keep = keep[:, :, 0]
    # Collapse batch and head dimensions that carry nothing new, so the common case is one call.
    if keep.shape[0] > 1 and bool((keep == keep[:1]).all()):
        keep = keep[:1]
    if keep.shape[1] > 1 and bool((keep == keep[:, :1]).all()):
        keep = keep[:, :1]
    return keep, None


def _attend(q, k, v, heads: int, keep: torch.Tensor) -> torch.Tensor:
    """Linear attention of q over the keys where ``keep`` (keys,) is True."""
    M = k.shape[1]
    idx = keep.nonzero().squeeze(1)
    n = idx.numel()
    if n == M:
        return linear_attention(q, k, v, heads)
    if n == 0:
        return q.new_zeros(q.shape)
    out = linear_attention(q, k.index_select(1, idx), v.index_select(1, idx), heads)
    # linear_attention divides phi(k)^T v by the query count N and the key sum by the key count n; the formula
    # above divides the former by N * n / M (n for self-attention) as well.
    return out.mul_(M / n)


def masked_linear_attention(q, k, v, heads: int, keep: torch.Tensor) -> torch.Tensor:
    """LinFusion attention on (B, tokens, C) tensors over the keys ``keep`` (from ``key_padding_keep``) keeps."""
    B, _, C = q.shape
    kb, kh, _ = keep.shape
    keep = keep.to(q.device)
    if kb == 1 and kh == 1:
        return _attend(q, k, v, heads, keep[0, 0])
    d = C // heads
    out = torch.empty_like(q)
    for b in range(B):
        rows = keep[b if kb > 1 else 0]
        qb, kb_, vb = q[b:b + 1], k[b:b + 1], v[b:b + 1]
        if kh == 1:
            out[b:b + 1] = _attend(qb, kb_, vb, heads, rows[0])
            continue
        for h in range(heads):  # the mask differs between heads: one head at a time
            s = slice(h * d, (h + 1) * d)
            out[b:b + 1, :, s] = _attend(qb[..., s].contiguous(), kb_[..., s].contiguous(),
                                         vb[..., s].contiguous(), 1, rows[h])
    return out


def warn_fallback_once(layer, reason: str) -> None:
    """One warning per layer instance that a mask sends it to the base layer's softmax attention."""
    if getattr(layer, "_linfusion_mask_warned", False):
        return
    layer._linfusion_mask_warned = True
    log.warning("LinFusion layer %s: %s; this layer runs the base model's softmax attention (quadratic in the "
                "token count) whenever it gets such a mask.", getattr(layer, "label", "") or "(unnamed)", reason)
