"""The low-memory mode's tensor tools, plain PyTorch: what fills memory in a LinFusion UNet step at 16K once
attention is linear, and how to take it out without changing a number.

- ``SkipParking``: the UNet's skip list holds every input block's output until the decoder uses it (SD-XL 16K,
  latent 2048x1024: about 7 GB in fp16 at batch 1). Each skip is parked in host memory when it is stored and
  brought back, last in first out, when the decoder pops it. On CUDA the copies go through pinned memory, the
  device-to-host copy on a side stream overlapping the next block, the copy back queued asynchronously (an
  optional prefetch on the side stream); elsewhere (CPU, MPS, XPU) they are plain synchronous copies. Exact.
- ``group_norm_silu``: a ResBlock's ``GroupNorm -> SiLU`` at full size makes two temporaries as large as its
  input (the normalised tensor and its activation). Here the output is written chunk by chunk into one tensor,
  SiLU in place on each fresh chunk. GroupNorm's statistics must cover a whole group, so chunks are either whole
  groups (slabs of channels; torch's kernel per slab, bit for bit the full-size result) or, for norms with few
  large groups, spatial chunks after two passes for the statistics (the mean, then the sum of squared deviations
  from it: the stable form, partial sums combined in float64), exact to float rounding. A two-pass version on
  the ResBlocks was measured at 1.8e-6 relative through a whole SD-1.5 UNet (44 norms, each within 1e-7 of
  torch's kernel), over the 1e-6 this mode promises; the slabs give 0.
- ``norm_silu_conv2d`` / ``upsample_conv2d`` (over ``conv2d_in_bands``): a ResBlock's ``GroupNorm -> SiLU -> conv``
  and an upsampler's ``nearest resize -> conv`` by bands of output rows, each band making only its input rows
  (plus the kernel's halo) from the block's input: the normalised or resized input never exists at full size.
  GroupNorm as torch's kernel computes it (its own statistics, over slabs of whole groups; its fused affine form),
  so bit for bit the full-size result on this CPU (tested, and 0.0 through whole UNets). ``conv2d_rows``: a
  convolution by bands of rows of its input (a ResBlock's 1x1 skip convolution, whose working copy on a CPU is
  the size of its input): single-threaded bit for bit; with several threads oneDNN may split a band among them
  otherwise than the whole tensor (within 1e-6 relative, tested).
- ``ConcatParts``: the decoder's ``cat([h, skip])`` read by bands of rows and slabs of channels made from its two
  parts, so a decoder ResBlock (whose skip convolution and ``in_layers`` both read by bands) never makes it.
- The LinFusion layers (layer.py, ``LinFusionAttention._token_chunked``) read ``is_enabled()`` too: in the mode a
  large layer runs in token chunks, its attention as the torch path's two passes over the same chunks (bit for bit
  the full-size result on this CPU, measured through whole SD-1.5 and SD-XL UNets).
- ``enabled()`` / ``is_enabled()``: whether the current UNet call runs in the mode (a context variable, set per
  call by the ComfyUI glue in nodes/lowmem.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

CHUNK_ELEMENTS = 1 << 22  # elements of one chunk of the GroupNorm input (16 MB in fp32; temporaries ~3x that)

_ENABLED = contextvars.ContextVar("linfusion_lowmem", default=False)


@contextlib.contextmanager
def enabled(on: bool = True):
    """Run the enclosed UNet call in the low-memory mode (or explicitly not)."""
    token = _ENABLED.set(bool(on))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def is_enabled() -> bool:
    return _ENABLED.get()


# -- GroupNorm + SiLU over chunks ----------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_norm_stats(x: torch.Tensor, num_groups: int, eps: float, chunk_elements: int = CHUNK_ELEMENTS):
    """Per (batch, group) mean and 1/sqrt(var + eps) of ``x`` (N, C, *spatial), float64, from two passes over
    chunks of the spatial axis: the mean, then the sum of squared deviations from it (biased variance, as
    GroupNorm uses)."""
    n, c = x.shape[:2]
    x4 = x.reshape(n, num_groups, c // num_groups, -1)  # a view for a contiguous x
    length = x4.shape[-1]
    step = max(1, chunk_elements // max(1, n * c))
    count = (c // num_groups) * length
    acc = _acc_dtype(x.dtype)
    total = torch.zeros(n, num_groups, dtype=torch.float64, device=x.device)
    for s in range(0, length, step):
        total += x4[..., s:s + step].sum(dim=(2, 3), dtype=acc).double()
    mean = total / count
    m_acc = mean.to(acc)[..., None, None]
    m2 = torch.zeros_like(total)
    for s in range(0, length, step):
        d = x4[..., s:s + step].to(acc) - m_acc
        m2 += d.mul_(d).sum(dim=(2, 3)).double()
        del d
    rstd = torch.rsqrt(m2 / count + eps)
    return mean, rstd


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float = 1e-5, chunk_elements: int = CHUNK_ELEMENTS, out: torch.Tensor | None = None,
                    method: str = "auto") -> torch.Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))`` with temporaries far below the input's size,
    written into ``out`` (new, or given); SiLU runs in place on the fresh normalised chunk, never on ``x``.

    method "slabs" (what "auto" picks when a group is at most 1/8 of the tensor, e.g. any ResBlock's 32 groups):
    whole groups at a time, as many as fit in ``chunk_elements`` (at least one), each slab normalised by torch's
    own kernel. A group's statistics are over its whole extent either way, so this is bit for bit what
    ``group_norm`` gives on the full tensor (tested), however the slabs fall.
    method "two_pass" (fewer, larger groups): statistics from two passes over spatial chunks
    (``group_norm_stats``), then each chunk normalised, scaled, shifted and activated straight into ``out``.
    Temporaries are chunk-sized; the result matches torch's kernel to float rounding (about 1e-7 relative).
    Inputs that fit in two chunks, or are not contiguous, take one full-size pass (SiLU still in place)."""
    n, c = x.shape[:2]
    if not x.is_contiguous() or x.numel() <= 2 * chunk_elements or c % num_groups:
        y = F.group_norm(x, num_groups, weight, bias, eps)
        if out is not None:
            out.copy_(y)
            y = out
        return F.silu(y, inplace=True)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    cpg = c // num_groups
    if method == "slabs" or (method == "auto" and num_groups >= 8):
        group_elements = x.numel() // num_groups
        k = max(1, chunk_elements // group_elements)
        for g0 in range(0, num_groups, k):
            g1 = min(num_groups, g0 + k)
            sl = slice(g0 * cpg, g1 * cpg)
            y = F.group_norm(x[:, sl], g1 - g0, None if weight is None else weight[sl],
                             None if bias is None else bias[sl], eps)
            out[:, sl] = F.silu(y, inplace=True)
            del y
        return out
    mean, rstd = group_norm_stats(x, num_groups, eps, chunk_elements)
    acc = _acc_dtype(x.dtype)
    # per (batch, channel): (x - mean) * scale + bias, scale = weight / std (float64, then the compute dtype)
    centre = mean.repeat_interleave(cpg, dim=1)
    scale = rstd.repeat_interleave(cpg, dim=1)
    if weight is not None:
        scale = scale * weight.double()
    shift = bias.double().expand(n, c) if bias is not None else torch.zeros_like(scale)
    centre, scale, shift = (v.to(acc)[..., None] for v in (centre, scale, shift))
    x3, o3 = x.reshape(n, c, -1), out.view(n, c, -1)
    length = x3.shape[-1]
    step = max(1, chunk_elements // max(1, n * c))
    for s in range(0, length, step):
        o = o3[..., s:s + step]
        if acc == x.dtype:  # straight in the output slice: no temporary at all
            o.copy_(x3[..., s:s + step]).sub_(centre).mul_(scale).add_(shift)
            F.silu(o, inplace=True)
        else:  # fp16/bf16: compute in float32, round once
            t = x3[..., s:s + step].to(acc).sub_(centre).mul_(scale).add_(shift)
            o.copy_(F.silu(t, inplace=True))
            del t
    return out


BAND_ELEMENTS = 1 << 24  # elements of one band of a convolution's input (rows x channels x width x batch)
MIN_BAND_ROWS = 4


def group_norm_scale_shift(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float = 1e-5, chunk_elements: int = CHUNK_ELEMENTS):
    """GroupNorm as a per (sample, channel) affine map: ``group_norm(x) == torch.addcmul(shift, x, scale)``, with
    ``scale`` and ``shift`` of shape (N, C, 1, ...) in the accumulation dtype (float32; float64 for float64).

    This is the form torch's CPU kernel computes (scale = rstd * weight, shift = bias - scale * mean with one
    rounding, y = x * scale + shift fused), with torch's own mean and rstd, taken from its kernel over slabs of whole
    groups (a group's statistics do not depend on the slab), so applying it to any rows of ``x`` gives those rows
    of ``group_norm(x)`` bit for bit on this CPU (tested); on CUDA to float rounding; fp16/bf16 inputs take the
    statistics of a float32 copy of each slab (the kernel's own are float32 but returned rounded), within float32
    rounding of the kernel's. Temporaries: one slab (in float32 for fp16/bf16). ``x`` may be a ``ConcatParts``."""
    n, c = x.shape[:2]
    cpg = c // num_groups
    hw = math.prod(x.shape[2:])
    k = max(1, chunk_elements // max(1, n * cpg * hw))
    means, rstds = [], []
    for g0 in range(0, num_groups, k):
        g1 = min(num_groups, g0 + k)
        # a view for one sample; a slab-sized copy for a batch, or from the parts of a ConcatParts
        slab = _channels(x, g0 * cpg, g1 * cpg)
        if slab.dtype not in (torch.float32, torch.float64):
            # the kernel normalises fp16/bf16 with float32 statistics but returns them rounded to the input's
            # dtype: take them from a float32 copy of the slab instead
            slab = slab.float()
        _, m, r = torch.native_group_norm(slab, None, None, n, slab.shape[1], hw, g1 - g0, eps)
        means.append(m.double())
        rstds.append(r.double())
        del slab, _
    acc = _acc_dtype(x.dtype)
    mean = torch.cat(means, 1).repeat_interleave(cpg, dim=1)
    scale = torch.cat(rstds, 1).repeat_interleave(cpg, dim=1)
    if weight is not None:  # a product of two float32s is exact in float64: this rounds once, as float32 would
        scale = scale * weight.double()
    scale = scale.to(acc)
    shift = -scale.double() * mean  # exact in float64; with the bias, one rounding below (the kernel's fma)
    if bias is not None:
        shift = shift + bias.double()
    view = (n, c) + (1,) * (x.dim() - 2)
    return scale.reshape(view), shift.to(acc).reshape(view)


def conv2d_in_bands(rows, in_shape, weight: torch.Tensor, bias: torch.Tensor | None, padding,
                    band_elements: int = BAND_ELEMENTS) -> torch.Tensor:
    """``conv2d(X, weight, bias, padding=padding)`` for a stride-1 convolution whose output has X's height, where
    ``rows(lo, hi)`` returns rows ``lo:hi`` of X (N, C, H, W = ``in_shape``), made on demand: X is never built at
    full size. Each band of output rows takes its input rows plus the kernel's halo, zero rows where the
    convolution pads the top and bottom, and the width padding as is. The same sums per output pixel as the
    full-size convolution (bit for bit on this CPU, tested)."""
    n, c_in, h, w = in_shape
    ph, pw = padding
    # at least MIN_BAND_ROWS rows, the last band too: for single rows oneDNN picks another kernel for some shapes
    # (320 -> 640 channels at 12x20: 3.9e-7 relative from the full-size convolution; on an AVX-512 CPU a last band
    # of one row, 64 -> 16 channels at 9x7: 4.8e-7); from two rows on, the same bits (measured)
    band = max(MIN_BAND_ROWS, band_elements // max(1, n * c_in * w))
    if band >= h:  # one band: the convolution as it is (an explicitly padded input may take another kernel)
        return F.conv2d(rows(0, h), weight, bias, padding=(ph, pw))
    starts = list(range(0, h, band))
    if h - starts[-1] < MIN_BAND_ROWS:  # no short last band either: the one before takes its rows
        starts.pop()
    out = None
    for i, a in enumerate(starts):
        b = starts[i + 1] if i + 1 < len(starts) else h
        lo, hi = max(0, a - ph), min(h, b + ph)
        r = rows(lo, hi)
        top, bottom = ph - (a - lo), ph - (hi - b)
        if top or bottom:
            r = F.pad(r, (0, 0, top, bottom))
        y = F.conv2d(r, weight, bias, padding=(0, pw))
        del r
        if out is None:
            out = torch.empty((n, y.shape[1], h, y.shape[3]), dtype=y.dtype, device=y.device)
        out[:, :, a:b] = y
        del y
    return out


def norm_silu_conv2d(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, padding, band_elements: int = BAND_ELEMENTS) -> torch.Tensor:
    """``conv2d(silu(group_norm(x)))`` of a ResBlock's in/out layers with the normalised input made band by band
    (``scale``/``shift`` from ``group_norm_scale_shift``; fp16/bf16 normalise in float32 and round once before the
    SiLU, as torch's kernel does). Holds ``x``, the output and one band's temporaries. ``x`` may be a
    ``ConcatParts``."""
    def rows(lo, hi):
        y = torch.addcmul(shift, _rows(x, lo, hi), scale)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return F.silu(y, inplace=True)
    return conv2d_in_bands(rows, x.shape, weight, bias, padding, band_elements)


def conv2d_rows(x, weight: torch.Tensor, bias: torch.Tensor | None, padding,
                band_elements: int = BAND_ELEMENTS) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=padding)`` (stride 1, 'same' padding) by bands of rows of ``x`` (a tensor
    or a ``ConcatParts``): the convolution's working copies are one band's (on a CPU, oneDNN's blocked copy of its
    input: for a decoder ResBlock's 1x1 skip convolution, three times the block's output)."""
    return conv2d_in_bands(lambda lo, hi: _rows(x, lo, hi), x.shape, weight, bias, padding, band_elements)


def _rows(x, lo: int, hi: int) -> torch.Tensor:
    return x.rows(lo, hi) if isinstance(x, ConcatParts) else x[:, :, lo:hi]


def _channels(x, c0: int, c1: int) -> torch.Tensor:
    return x.channels(c0, c1) if isinstance(x, ConcatParts) else x[:, c0:c1].contiguous()


class ConcatParts:
    """``torch.cat([a, b], 1)`` read by pieces: bands of rows and slabs of channels, each made from the parts when
    asked for (the same values as that piece of the concatenation), so the concatenation never exists at full
    size. Answers the few tensor questions the mode asks of an input (shape, dtype, device, ``dim``, ``numel``,
    ``is_contiguous``, ``requires_grad``) as the concatenation would; ``full()`` makes it whole where a piecewise
    read is not possible."""

    requires_grad = False

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.parts = (a, b)
        self.shape = torch.Size((a.shape[0], a.shape[1] + b.shape[1]) + tuple(a.shape[2:]))
        self.dtype, self.device = a.dtype, a.device

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        return True

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return torch.cat([p[:, :, lo:hi] for p in self.parts], 1)

    def channels(self, c0: int, c1: int) -> torch.Tensor:
        a, b = self.parts
        ca = a.shape[1]
        pieces = ([a[:, c0:min(c1, ca)]] if c0 < ca else []) + ([b[:, max(c0, ca) - ca:c1 - ca]] if c1 > ca else [])
        return torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0].contiguous()

    def full(self) -> torch.Tensor:
        return torch.cat(self.parts, 1)


def nearest_rows(out_rows: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Source rows of a nearest-neighbour resize from ``in_size`` to ``out_size`` rows, as torch's kernels pick
    them (``2x``: i // 2; otherwise floor(i * (in/out as float32)), clamped)."""
    if out_size == in_size:
        return out_rows
    if out_size == 2 * in_size:
        return out_rows // 2
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    return torch.floor(out_rows.float() * scale).long().clamp_(max=in_size - 1)


def upsample_conv2d(x: torch.Tensor, size, weight: torch.Tensor, bias: torch.Tensor | None, padding,
                    band_elements: int = BAND_ELEMENTS) -> torch.Tensor:
    """``conv2d(interpolate(x, size, mode="nearest"))`` (a UNet's Upsample) with the resized input made band by
    band: holds ``x``, the output and one band's temporaries instead of the resized tensor at full size."""
    n, c, h, w = x.shape
    oh, ow = size

    def rows(lo, hi):
        src = nearest_rows(torch.arange(lo, hi, device=x.device), h, oh)
        return F.interpolate(x.index_select(2, src), size=(hi - lo, ow), mode="nearest")
    return conv2d_in_bands(rows, (n, c, oh, ow), weight, bias, padding, band_elements)


def group_norm_silu_f64(x, num_groups, weight, bias, eps=1e-5) -> torch.Tensor:
    """The float64 reference: ``silu(group_norm(x))`` computed from the definition, not with torch's kernel."""
    n, c = x.shape[:2]
    xd = x.double().reshape(n, num_groups, -1)
    mean = xd.mean(dim=-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xd - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y * torch.sigmoid(y)


# -- the decoder's concatenation, made where it is read ------------------------------------------------------------

_LOG_ONCE = set()


class PendingConcat(torch.Tensor):
    """Stands for ``torch.cat([a, b], 1)`` without making it: a tensor with the concatenation's shape, dtype and
    device and no storage of its own, holding the two parts. A UNet's decoder concatenates each skip to its input
    and keeps the result alive through the whole output block, although only the block's first layer (a ResBlock)
    reads it; with this in its place, the ResBlock makes the concatenation itself (``take``) and releases it as
    soon as it has read it, and what the decoder keeps is this empty stand-in.

    ``torch.cat([pending, empty], 1)`` (a second part with no channels) gives a new stand-in for the same parts:
    that is how it passes through a ``th.cat`` it cannot avoid. Any other operation on it gets the full
    concatenation, made for that operation (the same numbers, only the memory is not saved; logged once); an
    operation that would write into it is an error (it would write into that temporary copy). After ``take`` it is
    spent: reading it again is an error, never a wrong number."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, a: torch.Tensor, b: torch.Tensor):
        shape = (a.shape[0], a.shape[1] + b.shape[1]) + tuple(a.shape[2:])
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=a.dtype, device=a.device, requires_grad=False)
        t.parts = (a, b)
        return t

    @staticmethod
    def can_stand_for(a, b) -> bool:
        """Whether ``torch.cat([a, b], 1)`` may be deferred: two plain tensors of one dtype and device, alike but
        for their channels, neither needing gradients."""
        return (type(a) is torch.Tensor and type(b) is torch.Tensor and a.dim() >= 2 and a.dim() == b.dim()
                and a.dtype == b.dtype and a.device == b.device and a.shape[0] == b.shape[0]
                and a.shape[2:] == b.shape[2:] and not (a.requires_grad or b.requires_grad))

    def take(self) -> torch.Tensor:
        """The concatenation, made now; the stand-in gives up its parts, so the caller holds the only reference."""
        return self.take_parts().full()

    def take_parts(self) -> ConcatParts:
        """The concatenation to be read by pieces (``ConcatParts``), never made whole; the stand-in gives up its
        parts, so the caller holds the only reference to them."""
        parts, self.parts = self._parts(), None
        return ConcatParts(*parts)

    def _parts(self):
        if self.parts is None:
            raise RuntimeError("LinFusion low-memory mode: the decoder's concatenation of a skip was read again after "
                               "the ResBlock that consumed it had released it")
        return self.parts

    def __repr__(self):
        return f"PendingConcat(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.cat.default:
            ts = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if (len(ts) == 2 and type(ts[0]) is cls and type(ts[1]) is not cls and ts[1].dim() == ts[0].dim()
                    and ts[1].shape[1] == 0 and dim % ts[0].dim() == 1):
                new = cls(*ts[0]._parts())
                ts[0].parts = None
                return new
        if func._schema.is_mutable:  # written into: that would change a temporary, and the picture silently
            raise RuntimeError(f"LinFusion low-memory mode: {func} would write into the stand-in for a skip "
                               "concatenation; set low_memory to off on Apply LinFusion for this model")
        if func not in _LOG_ONCE:
            _LOG_ONCE.add(func)
            logging.getLogger("LinFusion").info(
                "LinFusion low-memory mode: %s read a skip concatenation before its ResBlock did; it is made in "
                "full for it (the same result, without the memory saving)", func)

        def full(t):
            return torch.cat(t._parts(), 1) if type(t) is cls else t
        return func(*tree_map(full, args), **tree_map(full, kwargs))


# -- skip tensors in host memory -----------------------------------------------------------------------------------

def _pinned_empty(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)


def _plain_empty(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="cpu")


class SkipParking:
    """Parks tensors in host memory and brings them back in last-in-first-out order (the UNet's skip list).

    ``park(t)`` returns the host copy (what the skip list should hold); ``fetch(host)`` returns a device copy of
    the most recently parked tensor still parked, which must be ``host``; any other tensor is simply moved to the
    device (a patch of another pack may have replaced the skip). ``host_alloc(shape, dtype)`` chooses where host
    copies live (the CPU measurement gives a pre-allocated pool).

    On CUDA the device-to-host copy runs on a side stream into pinned memory while the caller's stream goes on
    with the next block (the skip's device memory is released to the caching allocator only once the copy is
    done: ``record_stream``). The copy back is an asynchronous pinned copy on the caller's stream, queued when the
    output block starts; ``prefetch=True`` instead starts copying the next skip back on the side stream as soon as
    one is fetched, which hides that copy too but holds one more skip on the device during the block, and at the
    first level, where a step peaks, that is a full-resolution skip: off by default."""

    def __init__(self, device, host_alloc=None, prefetch: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host_alloc = host_alloc or (_pinned_empty if self.cuda else _plain_empty)
        self.prefetch = prefetch and self.cuda
        self._stack = []  # [host, parked_event, prefetched device copy, its ready event]
        self.parked_bytes = 0
        self.peak_parked_bytes = 0

    def park(self, t: torch.Tensor) -> torch.Tensor:
        host = self.host_alloc(t.shape, t.dtype)
        ev = None
        if self.cuda and t.device.type == "cuda":
            cur = torch.cuda.current_stream(t.device)
            self.stream.wait_stream(cur)  # t is complete
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            t.record_stream(self.stream)  # the caching allocator keeps t's memory until the copy is done
        else:
            host.copy_(t)
        self._stack.append([host, ev, None, None])
        self.parked_bytes += host.numel() * host.element_size()
        self.peak_parked_bytes = max(self.peak_parked_bytes, self.parked_bytes)
        return host

    def _prefetch(self, entry):
        host, parked = entry[0], entry[1]
        with torch.cuda.stream(self.stream):
            if parked is not None:
                self.stream.wait_event(parked)
            dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            dev.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        entry[2], entry[3] = dev, ready

    def fetch(self, host: torch.Tensor) -> torch.Tensor:
        if not self._stack or self._stack[-1][0] is not host:
            return host.to(self.device)  # not ours (or out of order): a plain move
        entry = self._stack.pop()
        self.parked_bytes -= host.numel() * host.element_size()
        if not self.cuda:
            return host.to(self.device, copy=True)
        cur = torch.cuda.current_stream(self.device)
        if entry[2] is not None:  # prefetched on the side stream
            cur.wait_event(entry[3])
            dev = entry[2]
            dev.record_stream(cur)
        else:
            if entry[1] is not None:
                cur.wait_event(entry[1])  # the copy out has finished
            dev = host.to(self.device, non_blocking=True)
        if self.prefetch and self._stack and self._stack[-1][2] is None:
            self._prefetch(self._stack[-1])
        return dev

    def __len__(self):
        return len(self._stack)

    def clear(self):
        if self.cuda:
            self.stream.synchronize()
        self._stack.clear()
        self.parked_bytes = 0


def skip_bytes(input_shape, channel_mult, model_channels: int, num_res_blocks, dtype_size: int) -> int:
    """Bytes of a UNet's skip list at its fullest for a latent of ``input_shape`` (N, C, H, W): conv_in's output,
    then each level's ResBlock(+attention) outputs and its downsampler's (the level below's size)."""
    n, _, h, w = input_shape[:4]
    if isinstance(num_res_blocks, int):
        num_res_blocks = [num_res_blocks] * len(channel_mult)
    total = model_channels * h * w
    for level, (mult, blocks) in enumerate(zip(channel_mult, num_res_blocks)):
        total += blocks * mult * model_channels * h * w
        if level != len(channel_mult) - 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            total += mult * model_channels * h * w
    return n * total * dtype_size
