"""The formula written out directly, in fp32 (fp64 for fp64 inputs): the reference every other implementation is
tested against. Also the input checks all implementations share."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[int, int, int, int, int]:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected (B, tokens, C) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, N, C = q.shape
    M = k.shape[1]
    if k.shape[0] != B or v.shape[0] != B or v.shape[1] != M or k.shape[2] != C or v.shape[2] != C:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if heads <= 0 or C % heads:
        raise ValueError(f"C={C} is not divisible by heads={heads}")
    return B, N, M, C, C // heads


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32; keeps fp64 as fp64."""
    return torch.promote_types(dtype, torch.float32)


def linear_attention_reference(q, k, v, heads: int, eps: float = 1e-4) -> torch.Tensor:
    """Direct implementation of the formula in fp32 (or fp64 for fp64 inputs)."""
    B, N, M, C, d = _check(q, k, v, heads)
    acc = _acc_dtype(q.dtype)
    qh = q.to(acc).reshape(B, N, heads, d).transpose(1, 2)  # (B, H, N, d)
    kh = k.to(acc).reshape(B, M, heads, d).transpose(1, 2)  # (B, H, M, d)
    vh = v.to(acc).reshape(B, M, heads, d).transpose(1, 2)
    qf = F.elu(qh) + 1.0
    kf = F.elu(kh) + 1.0
    kv = kf.transpose(-1, -2) @ vh / N  # (B, H, d, d)
    kmean = kf.mean(dim=2, keepdim=True)  # (B, H, 1, d)
    den = (qf * kmean).sum(dim=-1, keepdim=True) + eps  # (B, H, N, 1)
    out = (qf @ kv) / den
    return out.transpose(1, 2).reshape(B, N, C).to(q.dtype)
