"""The authors' formulation of LinFusion's attention, transcribed: the baseline of the attention benchmark.

Lab code (never shipped, never imported by the pack). Heads folded into batch, input dtype throughout, as the
authors' code writes it. Pre-scales by the query-token count N, as the pack's formula states (the same thing for
self-attention, the only case LinFusion uses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def authors_style_attention(q, k, v, heads: int, eps: float = 1e-4) -> torch.Tensor:
    B, N, C = q.shape
    d = C // heads

    def head_to_batch(x):
        return x.reshape(B, -1, heads, d).permute(0, 2, 1, 3).reshape(B * heads, -1, d)

    query, key, value = head_to_batch(q), head_to_batch(k), head_to_batch(v)
    query = F.elu(query) + 1.0
    key = F.elu(key) + 1.0
    z = query @ key.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps
    scale = N ** -0.5
    kv = (key * scale).transpose(-2, -1) @ (value * scale)
    hidden = query @ kv / z
    return hidden.reshape(B, heads, N, d).permute(0, 2, 1, 3).reshape(B, N, C)
