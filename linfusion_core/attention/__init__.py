"""LinFusion's normalized non-causal linear attention.

Per sample and head (head size d = C / heads, head h = channels [h*d, (h+1)*d)):

    phi(u) = elu(u) + 1
    out = phi(q) (phi(k)^T v / N) / (phi(q) . mean_keys(phi(k)) + eps)

with N the number of *query* tokens. Inputs are ComfyUI-style (B, tokens, C) tensors with the heads
packed in C. k and v share a token count, which may differ from q's. Sums run in fp32 (or wider) for
fp16/bf16 inputs; the output has the input dtype. Nothing here is quadratic in the token count.

Implementations, one module each (the layout of flash-linear-attention's ops):
  naive.py          linear_attention_reference   plain and direct, for tests
  torch_fast.py     linear_attention_torch_fast  chunked two-pass torch version (CPU and any device)
  fused_triton.py   linear_attention_triton      Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)
  here              linear_attention             picks one (env LINFUSION_ATTENTION_IMPL = auto|reference|torch|triton)
"""
from __future__ import annotations

import os

import torch

from .fused_triton import (  # noqa: F401  (the private names: the tests read the geometry helpers)
    _TRITON_NUM_WARPS, CUDA_MAX_GRID, TritonGeometry, _apply_item, _kv_item, _triton_kernels,
    linear_attention_triton, triton_geometry, triton_supports)
from .naive import linear_attention_reference
from .torch_fast import linear_attention_torch_fast

__all__ = [
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_torch_fast",
    "linear_attention_triton",
    "triton_supports",
    "triton_geometry",
    "TritonGeometry",
    "CUDA_MAX_GRID",
    "IMPL_ENV",
]

IMPL_ENV = "LINFUSION_ATTENTION_IMPL"
_IMPLS = ("auto", "reference", "torch", "triton")


def selected_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> str:
    """'reference', 'torch' or 'triton': what linear_attention will run for these inputs."""
    choice = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    if choice not in _IMPLS:
        raise ValueError(f"{IMPL_ENV}={choice!r}: expected one of {', '.join(_IMPLS)}")
    if choice != "auto":
        return choice
    if q.is_cuda and triton_supports(q, k, v, heads) and _triton_kernels() is not None:
        return "triton"
    return "torch"


def linear_attention(q, k, v, heads: int, eps: float = 1e-4) -> torch.Tensor:
    """LinFusion attention on (B, tokens, C) tensors; see the module docstring."""
    impl = selected_impl(q, k, v, heads)
    if impl == "triton":
        return linear_attention_triton(q, k, v, heads, eps)
    if impl == "reference":
        return linear_attention_reference(q, k, v, heads, eps)
    return linear_attention_torch_fast(q, k, v, heads, eps)
