"""The Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1): kernel 1 reduces phi(k)^T v and sum phi(k) per
(sample, head, token split), kernel 2 applies the state to the queries. Importing this module never needs Triton;
it is imported on first use."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .naive import _check

# Largest head size the Triton kernels accept (they tile d in blocks of 64).
_TRITON_MAX_HEAD = 256
# Warps per Triton program. Compiled ahead of time with Triton 3.8 (no GPU needed, see
# tests/test_attention.py): with 4 warps the 64x64 fp32 tiles spill registers for fp32 inputs on
# sm_80/89/90/120 and for 16-bit inputs on sm_80 (and at head size 128 on sm_90/120); with 8 only
# fp32 inputs on sm_80 still spill (and a few bytes on sm_120). Not timed on hardware.
_TRITON_NUM_WARPS = 8


# Launch geometry. CUDA allows 2**31 - 1 programs on grid axis 0 but only 65535 on axes 1 and 2, and
# a 32768x32768 SD-1.5 image has 16.7 M first-level tokens (262144 blocks of 64). So each kernel
# numbers its work items 0 .. n_items - 1 and launches them on axis 0 alone; program p runs items
# p, p + programs, p + 2 * programs, ... (one item each, unless n_items exceeds max_programs). An item
# number turns into (sample, head, token block or split, tiles) by _kv_item / _apply_item: plain
# integer arithmetic that the kernels run jitted and the tests run in Python.

# CUDA's grid limits (blocks per launch) on axes 0, 1 and 2.
CUDA_MAX_GRID = (2**31 - 1, 65535, 65535)
_INT32_MAX = 2**31 - 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kv_item(w, H, n_splits, N_TILES):
    """kv-state work item -> (sample, head, key split, dk tile, dv tile); tiles vary fastest, then
    heads, so neighbouring programs read the same key rows."""
    tj = w % N_TILES
    w = w // N_TILES
    ti = w % N_TILES
    w = w // N_TILES
    h = w % H
    w = w // H
    return w // n_splits, h, w % n_splits, ti, tj


def _apply_item(w, H, n_blocks, N_TILES):
    """apply work item -> (sample, head, query block, dv tile); tiles vary fastest, then heads, so
    neighbouring programs read the same query rows."""
    tj = w % N_TILES
    w = w // N_TILES
    h = w % H
    w = w // H
    return w // n_blocks, h, w % n_blocks, tj


@dataclass(frozen=True)
class TritonGeometry:
    """Launch geometry of the two Triton kernels (pure arithmetic, no GPU or Triton needed)."""

    block_d: int  # head-size tile (tl.dot needs >= 16)
    n_tiles: int  # tiles per head size
    kv_block_n: int  # key tokens per step of the kv-state kernel
    tokens_per_split: int  # key tokens per kv-state item (a multiple of kv_block_n)
    n_splits: int  # key-token splits per (sample, head)
    kv_items: int  # B * H * n_tiles**2 * n_splits
    kv_grid: tuple[int, int, int]
    q_block_n: int  # query tokens per apply item
    n_qblocks: int  # query blocks per (sample, head)
    apply_items: int  # B * H * n_qblocks * n_tiles
    apply_grid: tuple[int, int, int]


def triton_geometry(B: int, H: int, N: int, M: int, d: int, *, target_programs: int,
                    max_programs: int = CUDA_MAX_GRID[0]) -> TritonGeometry:
    """Grids and block sizes for B samples, H heads of size d, N query and M key tokens.

    target_programs: how many programs the kv-state reduction should spread over (it splits the keys
    until it has about that many). max_programs: the most programs one launch may have; more items
    than that loop inside the programs (tests pass a tiny value to exercise the loop)."""
    if min(B, H, d, target_programs, max_programs) < 1 or min(N, M) < 0:
        raise ValueError(f"bad Triton geometry request: B={B} H={H} N={N} M={M} d={d} "
                         f"target_programs={target_programs} max_programs={max_programs}")
    block_d = 64 if d > 32 else max(16, 1 << (d - 1).bit_length())
    n_tiles = _cdiv(d, block_d)
    kv_block_n = 64
    n_kblocks = max(1, _cdiv(M, kv_block_n))
    n_splits = max(1, min(n_kblocks, target_programs // (B * H * n_tiles * n_tiles)))
    tokens_per_split = _cdiv(n_kblocks, n_splits) * kv_block_n
    n_splits = max(1, _cdiv(M, tokens_per_split))
    kv_items = B * H * n_tiles * n_tiles * n_splits
    q_block_n = 64
    n_qblocks = max(1, _cdiv(N, q_block_n))
    apply_items = B * H * n_qblocks * n_tiles
    # Item numbers and token offsets within a sample are int32 inside the kernels (element offsets
    # are int64): the item loop's last step reaches n_items + programs <= 2 * n_items, and token
    # offsets run a block past N and M. A 32768x32768 batch-4 launch has < 2**26 items.
    if max(2 * kv_items, 2 * apply_items, N + q_block_n, M + tokens_per_split) > _INT32_MAX:
        raise ValueError(f"too large for the Triton kernels: B={B} H={H} N={N} M={M} d={d}")
    return TritonGeometry(
        block_d=block_d, n_tiles=n_tiles, kv_block_n=kv_block_n, tokens_per_split=tokens_per_split,
        n_splits=n_splits, kv_items=kv_items, kv_grid=(min(kv_items, max_programs), 1, 1),
        q_block_n=q_block_n, n_qblocks=n_qblocks, apply_items=apply_items,
        apply_grid=(min(apply_items, max_programs), 1, 1),
    )


_TRITON = None  # (triton, kv_kernel, apply_kernel) once built; False if triton is unusable
tl = None  # triton.language, bound on first use so importing this module never needs triton
_tl_kv_item = _tl_apply_item = None  # jitted _kv_item / _apply_item, called by the kernels


def _triton_kernels():
    global _TRITON
    if _TRITON is None:
        try:
            _TRITON = _build_triton_kernels()
        except Exception:  # ImportError, or a triton too old for the language features used
            _TRITON = False
    return _TRITON or None


def _build_triton_kernels():
    global tl, _tl_kv_item, _tl_apply_item
    import triton
    import triton.language

    tl = triton.language
    # Kernels are module-level functions: Triton resolves names through the module's globals when it
    # compiles, so `tl` and the jitted helpers are bound here. The `tl.constexpr` annotations stay
    # strings (PEP 563) until then; the compiler looks them up too (a bare `constexpr` is a NameError
    # on a GPU, though the interpreter accepts it).
    _tl_kv_item = triton.jit(_kv_item)
    _tl_apply_item = triton.jit(_apply_item)
    return triton, triton.jit(_kv_state_kernel), triton.jit(_apply_kernel)


def _kv_state_kernel(
    k_ptr, v_ptr, kv_ptr, ks_ptr,
    M, H, D, tokens_per_split, n_splits, n_items,
    stride_kb, stride_kn, stride_kc,
    stride_vb, stride_vn, stride_vc,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    # Each item (sample b, head h, key split s, dk tile ti, dv tile tj) writes its split's partial
    # phi(k)^T v tile and (for dv tile 0) its partial sum of phi(k), both fp32.
    for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
        b, h, s, ti, tj = _tl_kv_item(w, H, n_splits, N_TILES)
        offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
        mi = offs_i < D
        mj = offs_j < D
        # int64 element offsets: a 32K image's q, k, v hold over 2**31 elements
        k_base = k_ptr + b.to(tl.int64) * stride_kb + (h * D + offs_i[None, :]) * stride_kc
        v_base = v_ptr + b.to(tl.int64) * stride_vb + (h * D + offs_j[None, :]) * stride_vc
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        start = s * tokens_per_split
        end = tl.minimum(start + tokens_per_split, M)
        for n0 in range(start, end, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            mn = offs_n < end
            mk = mn[:, None] & mi[None, :]
            kk = tl.load(k_base + offs_n[:, None] * stride_kn, mask=mk, other=0.0).to(tl.float32)
            # elu + 1 (exp only sees x <= 0, so no overflow); padding zeroed after phi since phi(0) = 1
            kf = tl.where(kk > 0, kk + 1.0, tl.exp(tl.minimum(kk, 0.0)))
            kf = tl.where(mk, kf, 0.0)
            vv = tl.load(v_base + offs_n[:, None] * stride_vn, mask=mn[:, None] & mj[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.dot(tl.trans(kf), vv, input_precision=PRECISION)
            ksum += tl.sum(kf, axis=0)
        part = ((b * H + h) * n_splits + s).to(tl.int64)  # row of the (B*H, n_splits, D, D) buffer
        tl.store(kv_ptr + (part * D + offs_i[:, None]) * D + offs_j[None, :], acc,
                 mask=mi[:, None] & mj[None, :])
        tl.store(ks_ptr + part * D + offs_i, ksum, mask=mi & (tj == 0))


def _apply_kernel(
    q_ptr, kv_ptr, km_ptr, o_ptr,
    N, H, D, eps, n_blocks, n_items,
    stride_qb, stride_qn, stride_qc,
    stride_ob, stride_on, stride_oc,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    # Each item (sample b, head h, query block blk, dv tile tj) writes BLOCK_N x BLOCK_D outputs.
    # kv (already / N) and kmean are fp32, (B*H, D, D) and (B*H, D).
    for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
        b, h, blk, tj = _tl_apply_item(w, H, n_blocks, N_TILES)
        bh = b * H + h
        offs_n = (blk * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64 element offsets, as above
        mn = offs_n < N
        offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
        mj = offs_j < D
        q_rows = q_ptr + b.to(tl.int64) * stride_qb + offs_n[:, None] * stride_qn
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        den = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for ti in range(N_TILES):
            offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
            mi = offs_i < D
            mq = mn[:, None] & mi[None, :]
            qq = tl.load(q_rows + (h * D + offs_i[None, :]) * stride_qc, mask=mq, other=0.0).to(tl.float32)
            qf = tl.where(qq > 0, qq + 1.0, tl.exp(tl.minimum(qq, 0.0)))
            qf = tl.where(mq, qf, 0.0)
            kvt = tl.load(kv_ptr + (bh * D + offs_i[:, None]) * D + offs_j[None, :],
                          mask=mi[:, None] & mj[None, :], other=0.0)
            km = tl.load(km_ptr + bh * D + offs_i, mask=mi, other=0.0)
            acc += tl.dot(qf, kvt, input_precision=PRECISION)
            den += tl.sum(qf * km[None, :], axis=1)
        out = acc / (den[:, None] + eps)
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + offs_n[:, None] * stride_on
                 + (h * D + offs_j[None, :]) * stride_oc,
                 out.to(o_ptr.dtype.element_ty), mask=mn[:, None] & mj[None, :])


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether the Triton kernels handle these inputs (dtype, head size); ignores the device."""
    if q.dim() != 3 or heads <= 0 or q.shape[-1] % heads:
        return False
    ok_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in ok_dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    return q.shape[-1] // heads <= _TRITON_MAX_HEAD


def linear_attention_triton(q, k, v, heads: int, eps: float = 1e-4, *, max_programs: int | None = None) -> torch.Tensor:
    """Triton forward: kernel 1 reduces phi(k)^T v and sum phi(k) per (batch, head, token split) in
    fp32, a deterministic torch sum merges the splits, kernel 2 applies the state to the queries.

    max_programs caps the programs per launch (default: CUDA's grid limit); tests lower it so that
    each program loops over several work items."""
    B, N, M, C, d = _check(q, k, v, heads)
    kernels = _triton_kernels()
    if kernels is None:
        raise RuntimeError("Triton is not importable")
    if not triton_supports(q, k, v, heads):
        raise ValueError(f"Triton path does not support dtype {q.dtype}/{k.dtype}/{v.dtype} or head size {d}")
    triton, kv_state_kernel, apply_kernel = kernels
    H = heads
    # fp32 inputs: full fp32 products ("ieee"; TF32 would cost ~1e-3 relative error). fp16/bf16:
    # operands are upcast to fp32 in the kernel (phi(k) and the fp32 state keep fp32's range, where
    # fp16 would overflow) and multiplied in TF32, whose 10-bit mantissa matches fp16's.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    out = torch.empty(B, N, C, dtype=q.dtype, device=q.device)
    if N == 0:
        return out
    if q.is_cuda:
        target = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count
    else:
        target = 8  # interpreter: few programs keep it quick
    g = triton_geometry(B, H, N, M, d, target_programs=target,
                        max_programs=CUDA_MAX_GRID[0] if max_programs is None else max_programs)

    kv_part = torch.empty(B * H, g.n_splits, d, d, dtype=torch.float32, device=q.device)
    ks_part = torch.empty(B * H, g.n_splits, d, dtype=torch.float32, device=q.device)
    kv_state_kernel[g.kv_grid](
        k, v, kv_part, ks_part,
        M, H, d, g.tokens_per_split, g.n_splits, g.kv_items,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        BLOCK_N=g.kv_block_n, BLOCK_D=g.block_d, N_TILES=g.n_tiles, PRECISION=precision,
        num_warps=_TRITON_NUM_WARPS,
    )
    kv = (kv_part.sum(dim=1) / N).contiguous()
    kmean = (ks_part.sum(dim=1) / max(M, 1)).contiguous()

    apply_kernel[g.apply_grid](
        q, kv, kmean, out,
        N, H, d, eps, g.n_qblocks, g.apply_items,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_N=g.q_block_n, BLOCK_D=g.block_d, N_TILES=g.n_tiles, PRECISION=precision,
        num_warps=_TRITON_NUM_WARPS,
    )
    return out
