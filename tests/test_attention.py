"""LinFusion linear attention: every implementation against an independent fp64 transcription.

No ComfyUI needed. The Triton kernels run under TRITON_INTERPRET=1 in a subprocess (Triton reads
that variable when it is imported)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from linfusion_core.attention import (
    IMPL_ENV,
    authors_style_attention,
    linear_attention,
    linear_attention_reference,
    linear_attention_torch_fast,
    selected_impl,
)

REPO = Path(__file__).resolve().parent.parent
EPS = 1e-4


def formula_fp64(q, k, v, heads, eps=EPS):
    """The formula with explicit per-sample, per-head loops in float64; phi written as a where()
    rather than elu, sums written out, so it shares no code path with the implementations."""
    q, k, v = q.double(), k.double(), v.double()
    B, N, C = q.shape
    d = C // heads
    out = torch.empty(B, N, C, dtype=torch.float64)
    for b in range(B):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            qh, kh, vh = q[b, :, cols], k[b, :, cols], v[b, :, cols]
            fq = torch.where(qh > 0, qh + 1.0, torch.exp(qh.clamp(max=0)))
            fk = torch.where(kh > 0, kh + 1.0, torch.exp(kh.clamp(max=0)))
            state = torch.einsum("mi,mj->ij", fk, vh) / N
            key_mean = fk.sum(dim=0) / kh.shape[0]
            numer = fq @ state
            denom = (fq * key_mean).sum(dim=1, keepdim=True) + eps
            out[b, :, cols] = numer / denom
    return out


def rel_err(got, want):
    got = got.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def make_qkv(B, N, C, dtype=torch.float32, M=None, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    M = N if M is None else M
    q = (torch.randn(B, N, C, generator=g) * scale).to(dtype)
    k = (torch.randn(B, M, C, generator=g) * scale).to(dtype)
    v = (torch.randn(B, M, C, generator=g) * scale).to(dtype)
    return q, k, v


# Every (heads, head size) pair at every token count; 4099 tokens (not a multiple of any chunk
# size) only up to C = 640 to keep the suite fast.
FP32_GRID = [(h, d, n) for h in (1, 5, 8, 10, 20) for d in (40, 64, 80) for n in (1, 7, 256, 4099)
             if n < 4099 or h * d <= 640]


@pytest.mark.parametrize("heads,head_dim,tokens", FP32_GRID)
def test_fp32_matches_formula(heads, head_dim, tokens):
    B = 1 + (heads + head_dim + tokens) % 2  # batch 1 and 2 across the grid
    q, k, v = make_qkv(B, tokens, heads * head_dim, seed=tokens + heads)
    want = formula_fp64(q, k, v, heads)
    ref = linear_attention_reference(q, k, v, heads)
    fast = linear_attention_torch_fast(q, k, v, heads)
    assert ref.dtype == fast.dtype == torch.float32
    assert ref.shape == fast.shape == q.shape
    assert rel_err(ref, want) < 1e-5
    assert rel_err(fast, want) < 1e-5


@pytest.mark.parametrize("chunk", [1, 3, 64, 1000, 4099, 10**6])
@pytest.mark.parametrize("B", [1, 2])
def test_fast_chunking(chunk, B):
    """Chunk sizes that do and do not divide the token count, smaller and larger than it."""
    q, k, v = make_qkv(B, 4099 if chunk > 3 else 301, 80, seed=chunk)
    want = formula_fp64(q, k, v, 2)
    assert rel_err(linear_attention_torch_fast(q, k, v, 2, chunk_tokens=chunk), want) < 1e-5


@pytest.mark.parametrize("heads,head_dim", [(1, 40), (5, 64), (8, 40), (10, 64), (20, 80)])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("B,tokens", [(1, 7), (2, 515)])
def test_half_precision(dtype, tol, heads, head_dim, B, tokens):
    q, k, v = make_qkv(B, tokens, heads * head_dim, dtype=dtype, seed=heads)
    want = formula_fp64(q, k, v, heads)  # on the already-rounded inputs: only the op's error counts
    for fn in (linear_attention_reference, linear_attention_torch_fast):
        got = fn(q, k, v, heads)
        assert got.dtype == dtype
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < tol, fn.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,M", [(256, 77), (100, 1000), (4099, 5)])
def test_kv_token_count_differs(N, M, dtype):
    """Mean over the key tokens, /N with the query-token count, as the formula says."""
    heads, C = 8, 320
    q, k, v = make_qkv(2, N, C, dtype=dtype, M=M, seed=N + M)
    want = formula_fp64(q, k, v, heads)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for fn in (linear_attention_reference, linear_attention_torch_fast, authors_style_attention):
        got = fn(q, k, v, heads)
        assert got.shape == q.shape
        assert rel_err(got, want) < tol, fn.__name__


def test_fp16_sums_accumulate_in_fp32():
    """fp16 inputs whose kv-state sums would overflow fp16 (max 65504) still give the right answer."""
    N, C, heads = 70_000, 16, 2
    g = torch.Generator().manual_seed(3)
    q = (torch.rand(1, N, C, generator=g) * 20 + 20).half()  # ~30: phi ~ 31
    k = (torch.rand(1, N, C, generator=g) * 20 + 20).half()
    v = (torch.rand(1, N, C, generator=g) * 20 + 20).half()
    # One entry of sum phi(k)^T v is ~ N * 31 * 30 and the key sum ~ N * 31: far past fp16's range.
    assert N * 31 * 20 > 65504 and N * 21 > 65504
    assert torch.isinf(torch.tensor(float(N * 31 * 20), dtype=torch.float16))
    want = formula_fp64(q, k, v, heads)
    for fn in (linear_attention_reference, linear_attention_torch_fast):
        got = fn(q, k, v, heads)
        assert got.dtype == torch.float16
        assert torch.isfinite(got).all(), fn.__name__
        assert rel_err(got, want) < 4e-3, fn.__name__


def test_authors_style_matches_formula():
    q, k, v = make_qkv(2, 300, 320, seed=11)
    assert rel_err(authors_style_attention(q, k, v, 8), formula_fp64(q, k, v, 8)) < 1e-5


def test_non_contiguous_inputs():
    """ComfyUI may hand over views (e.g. q, k, v sliced out of one fused projection)."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 333, 3 * 320, generator=g)
    q, k, v = qkv[..., :320], qkv[..., 320:640], qkv[..., 640:]
    want = formula_fp64(q, k, v, 8)
    assert rel_err(linear_attention_torch_fast(q, k, v, 8, chunk_tokens=100), want) < 1e-5
    assert rel_err(linear_attention_reference(q, k, v, 8), want) < 1e-5


def test_rejects_bad_shapes():
    q, k, v = make_qkv(1, 8, 30)
    with pytest.raises(ValueError):
        linear_attention_torch_fast(q, k, v, 4)  # 30 % 4 != 0
    with pytest.raises(ValueError):
        linear_attention_reference(q, k[:, :, :20], v, 2)


# ---------------------------------------------------------------------------------------------
# Memory: temporaries of the fast path stay O(chunk), far below O(tokens) and nowhere near O(tokens^2).

_MEMORY_PROBE = textwrap.dedent(
    """
    import json, os, resource, sys
    import torch
    from linfusion_core import attention as A

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    impl, N, C, H = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    fn = getattr(A, impl)
    fn(*(torch.randn(1, 300, C) for _ in range(3)), H)  # warm up: kernels, thread pool, allocator
    q, k, v = (torch.randn(1, N, C) for _ in range(3))
    base = rss()
    out = fn(q, k, v, H)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # peak - base over-states the call's extra memory when an earlier peak was higher: conservative.
    print(json.dumps({"extra": peak - base, "input": 3 * q.numel() * 4, "output": out.numel() * 4}))
    """
)


def _probe_memory(impl, N, C, H):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, impl, str(N), str(C), str(H)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_fast_path_temporary_memory_is_bounded():
    N, C, H = 131_072, 320, 8  # q + k + v = 480 MiB of fp32
    m = _probe_memory("linear_attention_torch_fast", N, C, H)
    temporaries = m["extra"] - m["output"]
    bound = 0.1 * m["input"]  # 10% of q+k+v; the fast path's chunk buffers are ~25 MiB
    assert temporaries <= bound, m
    # Anything that stores N x N scores (even one fp32 score matrix per sample and head) needs
    # N**2 * 4 bytes = 64 GiB here, so this bound rules out a quadratic implementation.
    assert bound < N * N * 4 / 1000
    # The probe does see token-proportional temporaries: the reference path (fp32 per-head copies
    # of q, k, v and phi) breaks the same bound.
    r = _probe_memory("linear_attention_reference", N, C, H)
    assert r["extra"] - r["output"] > bound, r


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (CPU tensors)

_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    try:
        import triton  # noqa: F401
    except Exception as e:
        print(json.dumps({"skip": "triton not importable: %r" % (e,)})); sys.exit(0)
    import torch
    from linfusion_core.attention import linear_attention_reference, linear_attention_triton
    torch.manual_seed(0)
    results = []
    # (B, N, M, heads, head size): head sizes that need masking (40, 80), tiling over d (80, 160),
    # token counts that are not multiples of the block, key count different from query count.
    for B, N, M, H, d in [(2, 300, 300, 2, 40), (1, 130, 77, 3, 80), (1, 65, 65, 1, 160), (2, 64, 64, 4, 64),
                          (1, 1, 1, 1, 40), (1, 200, 200, 2, 8)]:
        C = H * d
        q, k, v = torch.randn(B, N, C), torch.randn(B, M, C), torch.randn(B, M, C)
        want = linear_attention_reference(q.double(), k.double(), v.double(), H)
        got = linear_attention_triton(q, k, v, H)
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        results.append({"shape": [B, N, M, H, d], "err": err, "dtype": str(got.dtype), "finite": bool(torch.isfinite(got).all())})
    q, k, v = (torch.randn(2, 150, 320).half() for _ in range(3))
    want = linear_attention_reference(q.double(), k.double(), v.double(), 8)
    got = linear_attention_triton(q, k, v, 8)
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    results.append({"shape": "fp16", "err": err, "dtype": str(got.dtype), "finite": bool(torch.isfinite(got).all())})
    print(json.dumps({"results": results}))
    """
)


@pytest.fixture(scope="module")
def triton_interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in data:
        pytest.skip(data["skip"])
    return data["results"]


def test_triton_interpreter_fp32(triton_interpreter_results):
    fp32 = [r for r in triton_interpreter_results if r["shape"] != "fp16"]
    assert fp32
    for r in fp32:
        assert r["dtype"] == "torch.float32" and r["finite"], r
        assert r["err"] < 1e-5, r


def test_triton_interpreter_fp16(triton_interpreter_results):
    (r,) = [r for r in triton_interpreter_results if r["shape"] == "fp16"]
    assert r["dtype"] == "torch.float16" and r["finite"], r
    assert r["err"] < 4e-3, r


# ---------------------------------------------------------------------------------------------
# Dispatcher


def test_dispatcher_env(monkeypatch):
    q, k, v = make_qkv(1, 50, 80, seed=9)
    want = formula_fp64(q, k, v, 2)
    monkeypatch.delenv(IMPL_ENV, raising=False)
    assert selected_impl(q, k, v, 2) == "torch"  # CPU tensors: never Triton on auto
    for choice, expected in [("auto", "torch"), ("reference", "reference"), ("torch", "torch"),
                             (" Reference ", "reference"), ("", "torch")]:
        monkeypatch.setenv(IMPL_ENV, choice)
        assert selected_impl(q, k, v, 2) == expected
        assert rel_err(linear_attention(q, k, v, 2), want) < 1e-5
    monkeypatch.setenv(IMPL_ENV, "triton")
    assert selected_impl(q, k, v, 2) == "triton"
    monkeypatch.setenv(IMPL_ENV, "flash")
    with pytest.raises(ValueError, match=IMPL_ENV):
        linear_attention(q, k, v, 2)


def test_dispatcher_calls_forced_impl(monkeypatch):
    from linfusion_core import attention as A

    calls = []
    monkeypatch.setattr(A, "linear_attention_reference", lambda *a, **kw: calls.append("reference"))
    monkeypatch.setattr(A, "linear_attention_torch_fast", lambda *a, **kw: calls.append("torch"))
    monkeypatch.setattr(A, "linear_attention_triton", lambda *a, **kw: calls.append("triton"))
    q, k, v = make_qkv(1, 4, 16)
    for choice in ("reference", "torch", "triton", "auto"):
        monkeypatch.setenv(IMPL_ENV, choice)
        A.linear_attention(q, k, v, 2)
    assert calls == ["reference", "torch", "triton", "torch"]
