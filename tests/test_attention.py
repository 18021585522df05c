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

import numpy as np
import pytest
import torch

from benchmarks.authors_attention import authors_style_attention
from linfusion_core import attention
from linfusion_core.attention import (
    CUDA_MAX_GRID,
    IMPL_ENV,
    linear_attention,
    linear_attention_reference,
    linear_attention_torch_fast,
    selected_impl,
    triton_geometry,
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
    # One entry of sum phi(k)^T v is ~ N * 31 * 30 and the key sum ~ N * 31: far past fp16's range. The premise,
    # checked on the data: summing phi(k) in fp16 overflows.
    assert torch.isinf((torch.nn.functional.elu(k) + 1).sum(dim=1, dtype=torch.float16)).any()
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
    # N**2 * 4 bytes = 64 GiB here, so this bound (48 MiB) rules out a quadratic implementation.
    # The probe does see token-proportional temporaries: the reference path (fp32 per-head copies
    # of q, k, v and phi) breaks the same bound.
    r = _probe_memory("linear_attention_reference", N, C, H)
    assert r["extra"] - r["output"] > bound, r


# ---------------------------------------------------------------------------------------------
# Triton launch geometry (pure arithmetic, no GPU): CUDA allows 2**31 - 1 programs on grid axis 0
# and 65535 on axes 1 and 2.

# Self-attention levels per family: (channels, heads, tokens = latent pixels / divisor). SD-1.5
# keeps 8 heads; SD-2.x and SD-XL use head size 64; SD-XL's first level is at latent / 2. "corners":
# the least and the most work per token within heads 5-20 x head size 40-128, at SD-1.5's count.
ATTN_LEVELS = {
    "sd15": [(320, 8, 1), (640, 8, 4), (1280, 8, 16)],
    "sd2x": [(320, 5, 1), (640, 10, 4), (1280, 20, 16)],
    "sdxl": [(640, 10, 4), (1280, 20, 16)],
    "corners": [(200, 5, 1), (2560, 20, 1)],
}
IMAGES = [(16384, 8192), (16384, 16384), (32768, 32768)]
GEOMETRY_CASES = [(fam, w, h, B) for fam in ATTN_LEVELS for (w, h) in IMAGES for B in (1, 2, 4)]
# linear_attention_triton asks for 4 programs per SM on CUDA (H100: 132 SMs), 8 under the interpreter
TARGET_PROGRAMS = (8, 4 * 132)


def _levels(family, width, height):
    """(channels, heads, tokens) of each self-attention level at this image size."""
    return [(C, H, (width // 8) * (height // 8) // div) for C, H, div in ATTN_LEVELS[family]]


@pytest.mark.parametrize("family,width,height,batch", GEOMETRY_CASES)
def test_triton_grid_within_cuda_limits(family, width, height, batch):
    """Every launch of either kernel fits CUDA's grid limits, up to 32768 x 32768 at batch 4."""
    assert _levels("sd15", 32768, 32768)[0][2] == 16_777_216 and _levels("sdxl", 32768, 32768)[0][2] == 4_194_304
    for C, H, N in _levels(family, width, height):
        for target in TARGET_PROGRAMS:
            g = triton_geometry(batch, H, N, N, C // H, target_programs=target)
            for name, grid in (("kv-state", g.kv_grid), ("apply", g.apply_grid)):
                assert len(grid) == 3 and all(1 <= x <= lim for x, lim in zip(grid, CUDA_MAX_GRID)), \
                    f"{name} grid {grid} for B={batch} H={H} N={N} d={C // H} exceeds {CUDA_MAX_GRID}"


def _programs(grid, n_items, chunk=1 << 20):
    """The work items a launch runs, in chunks: program p of grid[0] takes items p, p + grid[0],
    p + 2 * grid[0], ... below n_items (the loop at the top of both kernels)."""
    assert grid[1] == grid[2] == 1 and n_items < 2**31  # item numbers are int32 in the kernels too
    P = grid[0]
    for lo in range(0, P, chunk):
        w = np.arange(lo, min(lo + chunk, P), dtype=np.int32)
        while w.size:
            yield w
            w = w[w < n_items - P] + P  # (no int32 overflow)


def _assert_partition(starts, ends, total, what):
    """[starts[i], ends[i]) are non-empty, consecutive, and together exactly [0, total)."""
    assert starts[0] == 0 and ends[-1] == total, what
    assert (ends > starts).all() and (starts[1:] == ends[:-1]).all(), what


def _assert_each_token_once(g, B, H, N, M, d):
    """Simulate both launches: every (sample, head, token block, tile) is run by exactly one
    program, and the blocks and tiles cover every query/key token and channel exactly once."""
    _assert_partition(np.arange(g.n_tiles) * g.block_d,
                      np.minimum(np.arange(1, g.n_tiles + 1) * g.block_d, d), d, "head-size tiles")
    # apply kernel: item -> (sample b, head h, query block blk, dv tile tj)
    seen = np.zeros(B * H * g.n_qblocks * g.n_tiles, dtype=np.uint8)
    n = 0
    for w in _programs(g.apply_grid, g.apply_items):
        b, h, blk, tj = attention._apply_item(w, H, g.n_qblocks, g.n_tiles)
        for x, hi in ((b, B), (h, H), (blk, g.n_qblocks), (tj, g.n_tiles)):
            assert x.min() >= 0 and x.max() < hi
        seen[((b * H + h) * g.n_qblocks + blk) * g.n_tiles + tj] += 1
        n += w.size
    # as many items as slots and every slot seen once: no slot twice, none missed
    assert n == seen.size and (seen == 1).all()
    starts = np.arange(g.n_qblocks, dtype=np.int64) * g.q_block_n
    _assert_partition(starts, np.minimum(starts + g.q_block_n, N), N, "query blocks")
    # kv-state kernel: item -> (sample b, head h, key split s, dk tile ti, dv tile tj)
    seen = np.zeros(B * H * g.n_splits * g.n_tiles**2, dtype=np.uint8)
    n = 0
    for w in _programs(g.kv_grid, g.kv_items):
        b, h, s, ti, tj = attention._kv_item(w, H, g.n_splits, g.n_tiles)
        for x, hi in ((b, B), (h, H), (s, g.n_splits), (ti, g.n_tiles), (tj, g.n_tiles)):
            assert x.min() >= 0 and x.max() < hi
        seen[(((b * H + h) * g.n_splits + s) * g.n_tiles + ti) * g.n_tiles + tj] += 1
        n += w.size
    assert n == seen.size and (seen == 1).all()
    assert g.tokens_per_split % g.kv_block_n == 0  # each split steps through whole key blocks
    starts = np.arange(g.n_splits, dtype=np.int64) * g.tokens_per_split
    _assert_partition(starts, np.minimum(starts + g.tokens_per_split, M), M, "key splits")


@pytest.mark.parametrize("family,width,height,batch", GEOMETRY_CASES)
def test_triton_geometry_covers_each_token_once(family, width, height, batch):
    for C, H, N in _levels(family, width, height):
        for target in TARGET_PROGRAMS:
            g = triton_geometry(batch, H, N, N, C // H, target_programs=target)
            assert g.apply_grid[0] == g.apply_items and g.kv_grid[0] == g.kv_items  # one item each
            _assert_each_token_once(g, batch, H, N, N, C // H)


@pytest.mark.parametrize("max_programs", [1, 2, 7, 64, 10**9])
@pytest.mark.parametrize("B,H,N,M,d", [(2, 3, 1000, 700, 80), (1, 20, 4097, 77, 128), (4, 5, 1, 1, 40)])
def test_triton_geometry_folded_covers_each_token_once(B, H, N, M, d, max_programs):
    """With fewer programs than work items the programs loop, and still cover everything once."""
    g = triton_geometry(B, H, N, M, d, target_programs=64, max_programs=max_programs)
    assert g.kv_grid[0] <= max_programs and g.apply_grid[0] <= max_programs
    _assert_each_token_once(g, B, H, N, M, d)


def test_triton_geometry_rejects_int32_overflow():
    """Item numbers and in-sample token offsets are int32 in the kernels: refuse, never wrap."""
    triton_geometry(4, 20, 2**28, 2**28, 128, target_programs=528)  # 64x a 32K image: still fine
    with pytest.raises(ValueError, match="too large"):
        triton_geometry(1, 1, 2**31, 16, 64, target_programs=8)
    with pytest.raises(ValueError, match="too large"):
        triton_geometry(64, 64, 2**28, 16, 64, target_programs=8)  # 2**37 items
    with pytest.raises(ValueError):
        triton_geometry(1, 1, 16, 16, 64, target_programs=8, max_programs=0)


# ---------------------------------------------------------------------------------------------
# Triton kernels compiled ahead of time for real GPUs (no GPU needed: Triton ships ptxas). The
# interpreter never compiles, so this is what catches code that only the compiler rejects.

_TRITON_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, tempfile
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as e:
        print(json.dumps({"skip": "triton's compiler is not importable: %r" % (e,)})); sys.exit(0)
    from linfusion_core.attention import fused_triton as A

    _, kv_kernel, apply_kernel = A._build_triton_kernels()
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = []
    for arch in map(int, sys.argv[1:]):
        for dt, d in (("fp16", 40), ("bf16", 128), ("fp32", 64)):
            # argument types as a launch at 2 x 4.2 M tokens passes them (batch strides past 2**31)
            g = A.triton_geometry(2, 8, 4_194_304, 4_194_304, d, target_programs=528)
            consts = {"BLOCK_D": g.block_d, "N_TILES": g.n_tiles, "PRECISION": "ieee" if dt == "fp32" else "tf32"}
            kv = dict(k_ptr="*" + dt, v_ptr="*" + dt, kv_ptr="*fp32", ks_ptr="*fp32", M="i32", tokens_per_split="i32",
                      n_splits="i32", stride_kb="i64", stride_kn="i32", stride_vb="i64", stride_vn="i32")
            apply = dict(q_ptr="*" + dt, kv_ptr="*fp32", km_ptr="*fp32", o_ptr="*" + dt, N="i32", eps="fp32",
                         n_blocks="i32", stride_qb="i64", stride_qn="i32", stride_ob="i64", stride_on="i32")
            for name, fn, sig, extra in (
                ("kv", kv_kernel, kv, dict(stride_kc=1, stride_vc=1, BLOCK_N=g.kv_block_n)),
                ("apply", apply_kernel, apply, dict(stride_qc=1, stride_oc=1, BLOCK_N=g.q_block_n)),
            ):
                cst = dict(consts, **extra)
                sig = dict(sig, H="i32", D="i32", n_items="i32", **{c: "constexpr" for c in cst})
                sig = {a: sig[a] for a in fn.arg_names}  # every argument, in order
                aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a][0] == "*"}
                c = triton.compile(ASTSource(fn, sig, cst, aligned), target=GPUTarget("cuda", arch, 32),
                                   options={"num_warps": A._TRITON_NUM_WARPS})
                mma = [l for l in c.asm["ptx"].splitlines() if "mma" in l and not l.lstrip().startswith("//")]
                usage = ""
                if os.path.exists(cuobjdump):  # registers and stack (spills) per thread
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(c.asm["cubin"])
                        f.flush()
                        dump = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                              capture_output=True, text=True).stdout
                    usage = " ".join(w for l in dump.splitlines() if "REG:" in l for w in l.split()[:2])
                out.append({"arch": arch, "kernel": name, "dtype": dt, "d": d, "shared": c.metadata.shared,
                            "warps": c.metadata.num_warps, "tf32_mma": any("tf32" in l for l in mma),
                            "usage": usage})
    print(json.dumps({"results": out}))
    """
)
# Most shared memory one block may use (opt-in), bytes: sm_86/89 (RTX 30xx/40xx), sm_90 (H100/H200).
_MAX_SHARED = {86: 99 * 1024, 90: 227 * 1024}


def test_triton_kernels_compile_for_gpu(tmp_path):
    """Both kernels compile for an RTX 30xx/40xx-class GPU (sm_86) and an H100 (sm_90) in fp16,
    bf16 and fp32, fit their shared memory, and use TF32 tensor cores only for 16-bit inputs."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _TRITON_COMPILE_SCRIPT, "86", "90"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in data:
        pytest.skip(data["skip"])
    assert {r["arch"] for r in data["results"]} == {86, 90}
    for r in data["results"]:
        arch = r["arch"]
        print(f"sm_{arch} {r['kernel']} {r['dtype']} d={r['d']}: shared {r['shared']} B, {r['usage']}")
        assert r["warps"] == attention._TRITON_NUM_WARPS
        assert r["shared"] <= _MAX_SHARED[arch], r
        # fp32 inputs multiply in full fp32 (no TF32 tensor-core op); 16-bit inputs use TF32 MMAs
        assert r["tf32_mma"] == (r["dtype"] != "fp32"), r


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (CPU tensors)
#
# The interpreter multiplies fp32 exactly whatever tl.dot's input_precision says; the script makes
# its tl.dot drop the low 13 mantissa bits of both operands when TF32 is asked for (truncation, the
# worst a tensor core does), so 16-bit results below carry TF32's error and an fp32 call that asked
# for TF32 would show it.

_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    try:
        import triton  # noqa: F401
    except Exception as e:
        print(json.dumps({"skip": "triton not importable: %r" % (e,)})); sys.exit(0)
    import numpy as np
    import torch
    from linfusion_core.attention import linear_attention_reference, linear_attention_triton, triton_geometry

    tf32_dots = [0]
    try:
        from triton.runtime import interpreter as I
        plain_dot = I.InterpreterBuilder.create_dot

        def tf32(h):
            bits = np.ascontiguousarray(h.data).view(np.uint32) & np.uint32(0xFFFFE000)
            return I.TensorHandle(bits.view(np.float32), h.dtype)

        def create_dot(self, a, b, d, input_precision, *rest):
            name = str(getattr(input_precision, "name", input_precision)).split(".")[-1].upper()
            if name == "TF32" and a.data.dtype == np.float32:
                tf32_dots[0] += 1
                a, b = tf32(a), tf32(b)
            return plain_dot(self, a, b, d, input_precision, *rest)

        I.InterpreterBuilder.create_dot = create_dot
        emulated = True
    except Exception:
        emulated = False

    torch.manual_seed(0)
    results = []
    # (B, N, M, heads, head size, max programs): head sizes that need masking (40, 80), tiling over d
    # (80, 160), token counts that are not multiples of the block, key count different from query
    # count; max programs below the work items makes every program loop (the fold for huge images).
    FP32 = [(2, 300, 300, 2, 40, None), (1, 130, 77, 3, 80, None), (1, 65, 65, 1, 160, None),
            (2, 64, 64, 4, 64, None), (1, 1, 1, 1, 40, None), (1, 200, 200, 2, 8, None)]
    HALF = [(2, 150, 150, 8, 40, None)]
    FOLDED = [(1, 150, 100, 2, 80, 3), (1, 70, 77, 3, 40, 5)]
    cases = [(torch.float32, c) for c in FP32 + FOLDED]
    cases += [(dt, c) for dt in (torch.float16, torch.bfloat16) for c in HALF + FOLDED]
    for dtype, (B, N, M, H, d, max_programs) in cases:
        C = H * d
        q, k, v = (torch.randn(B, n, C).to(dtype) for n in (N, M, M))
        want = linear_attention_reference(q.double(), k.double(), v.double(), H)
        before = tf32_dots[0]
        got = linear_attention_triton(q, k, v, H, max_programs=max_programs)
        g = triton_geometry(B, H, N, M, d, target_programs=8, **({} if max_programs is None else {"max_programs": max_programs}))
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        results.append({"shape": [B, N, M, H, d], "in_dtype": str(dtype), "dtype": str(got.dtype), "err": err,
                        "finite": bool(torch.isfinite(got).all()), "tf32_dots": tf32_dots[0] - before,
                        "folded": g.kv_grid[0] < g.kv_items and g.apply_grid[0] < g.apply_items})
    print(json.dumps({"results": results, "tf32_emulated": emulated}))
    """
)
INTERPRETER_TOL = {"torch.float32": 1e-5, "torch.float16": 4e-3, "torch.bfloat16": 3e-2}


@pytest.fixture(scope="module")
def triton_interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in data:
        pytest.skip(data["skip"])
    return data


@pytest.mark.parametrize("dtype", sorted(INTERPRETER_TOL))
def test_triton_interpreter_matches_reference(triton_interpreter_results, dtype):
    rows = [r for r in triton_interpreter_results["results"] if r["in_dtype"] == dtype]
    assert len(rows) >= 3
    for r in rows:
        print(dtype, r["shape"], "folded" if r["folded"] else "", f"{r['err']:.2e}")
        assert r["dtype"] == dtype and r["finite"], r
        assert r["err"] < INTERPRETER_TOL[dtype], r


def test_triton_interpreter_folded_launch(triton_interpreter_results):
    """Cases with fewer programs than work items ran in every dtype (and matched, above)."""
    folded = {r["in_dtype"] for r in triton_interpreter_results["results"] if r["folded"]}
    assert folded == set(INTERPRETER_TOL)


def test_triton_dot_precision(triton_interpreter_results):
    """fp32 inputs never ask tl.dot for TF32; fp16/bf16 inputs do (their errors above include it)."""
    if not triton_interpreter_results["tf32_emulated"]:
        pytest.skip("this Triton's interpreter could not be patched to emulate TF32")
    for r in triton_interpreter_results["results"]:
        assert (r["tf32_dots"] > 0) == (r["in_dtype"] != "torch.float32"), r


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
