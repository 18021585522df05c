"""The low-memory mode of a LinFusion-patched model, on ComfyUI's patch points (the tensor work is in
linfusion_core/lowmem.py). Exact: a step gives the same numbers with and without it (tested through whole UNets,
with and without a ControlNet: on a CPU single-threaded the same bits; with several threads within the 1e-6 the
issue allows, about what stock ComfyUI moves between thread counts, because oneDNN may split a band's 1x1
convolution among threads otherwise than the whole tensor's; see ``skip_conv``).

What it installs on the patched clone (``install``), for ``low_memory`` "auto" or "on" ("off" installs nothing):
- An object patch on every ResBlock: the same block (same children, so weight names, LoRA keys and casting are
  untouched) whose two sums, while the mode is on for the call, go in place into fresh tensors (the time
  embedding into ``in_layers``' output, ``out_layers``' output into the skip connection's), and whose
  ``in_layers`` and ``out_layers`` are Sequentials over the same children which, while the mode is on, run their
  ``GroupNorm -> SiLU -> conv`` by bands of rows (torch's own group statistics first, then each band normalised,
  activated and convolved with its halo: the normalised input never exists at full size; bit for bit the stock
  result on this CPU), or for inputs under two bands the GroupNorm + SiLU in whole-group chunks, and as ComfyUI
  runs it otherwise. Likewise every 2-D ``Upsample`` (a subclass of ComfyUI's, same children): its nearest resize
  and convolution by bands of rows, so the resized input never exists at full size.
- An object patch on every SpatialTransformer's ``transformer_blocks``: the same list over the same children dict
  (so the LinFusion layers patched under it land on the same blocks), which while the mode is on yields callers
  that run each plain transformer block in token chunks (``transformer_block_in_chunks``: the LinFusion layer's
  sums first, then norms, both attentions, the feed-forward and the residual adds chunk by chunk), so a block
  holds its input, its output and one chunk. A block with a patch of its own (attn1/attn2 patches, output
  patches, attention replacements) runs as ComfyUI's.
- An APPLY_MODEL wrapper that decides per call whether the mode is on ("on": always; "auto": when the patched
  model's estimate says the step would not fit in free memory without it) and, when it is, adds three patches to
  that call's transformer_options: ``input_block_patch`` (last: park the skip in host memory, so the skip list
  holds the host copy), ``input_block_patch_after_skip`` (first: hand the device tensor on to the next block) and
  ``output_block_patch`` (first: bring the skip back, then add the ControlNet residual). ComfyUI's UNet adds the
  ControlNet's output residuals to the popped skip *before* ``output_block_patch`` runs, with a try/except that
  drops the residual with a warning when the two sit on different devices; so the call's ``control`` goes to the
  UNet with those residuals replaced by None (ComfyUI then adds nothing) and the patch adds each one to the
  device copy of its skip, the same in-place add, in the same order. A second ``output_block_patch`` (last)
  hands the UNet a stand-in for its ``cat([h, skip])`` (``lowmem.PendingConcat``): the output block's ResBlock
  (ours) takes its two parts (``lowmem.ConcatParts``), runs its 1x1 skip convolution and ``in_layers`` over them
  by bands of rows, so the concatenation never exists at full size (made whole only for inputs under two
  bands), and frees them as soon as ``in_layers`` has read them, where ComfyUI's UNet holds the concatenation
  through the whole output block.
- The memory estimate knows the mode (nodes/memory.py, ``install_memory_estimate(..., low_memory=)``): "on"
  reports the low-memory line; "auto" reports the ordinary line when the step fits in the memory that will be
  free once the weights are loaded, the ordinary line too when the batch does not fit but half of it does (so
  ComfyUI runs cond and uncond one after the other without the mode, which costs no time at high resolution),
  and the low-memory line otherwise. ComfyUI sizes its weight loading and its cond/uncond batching from that.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import comfy.ops
import torch
from torch import nn

from ..linfusion_core import lowmem
from ..linfusion_core.layer import LinFusionAttention, runs_softmax
from .comfy_ops import weight_and_bias

log = logging.getLogger("LinFusion")

KEY = "linfusion_lowmem"
MODES = ("auto", "on", "off")
TOOLTIP = ("Low-memory mode for very large images (exact: the same result): the UNet's skip tensors wait in CPU "
           "memory, ResBlocks, upsamplers and transformer blocks run in pieces, and cond/uncond run one after the "
           "other when both do not fit. auto = only when a step would not fit in free GPU memory otherwise; "
           "on = always; off = never. Costs time when on (the copies to and from the CPU).")

# Where parked skips live on non-CUDA devices: None = plain CPU tensors. The CPU measurement
# (harness/step_memory.py) sets a pre-allocated pool here, so that parked skips count as host memory, not as the
# step's working memory.
HOST_ALLOC = None

# Convolutions whose input would exceed two bands of this many elements run band by band in the mode (read at call
# time; tests make it small).
BAND_ELEMENTS = lowmem.BAND_ELEMENTS


def normalize_mode(mode) -> str:
    if mode is True:
        return "on"
    if mode in (False, None):
        return "off"
    mode = str(mode).lower()
    if mode not in MODES:
        raise ValueError(f"low_memory must be one of {MODES}, not {mode!r}")
    return mode


# -- ResBlock GroupNorm + SiLU -------------------------------------------------------------------------------------

def _autograd_needs(x: torch.Tensor, gn: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in gn.parameters()))


class NormActSequential(nn.Sequential):
    """A ResBlock's ``in_layers`` / ``out_layers`` (GroupNorm, SiLU, ...), the same child modules under the same
    names. While the low-memory mode is on for the call and autograd is off, the GroupNorm and the SiLU run as
    one chunked pass (``lowmem.group_norm_silu``: two-pass statistics, SiLU in place on the fresh output, never
    on a tensor anyone else holds); otherwise exactly as ``nn.Sequential``. ResBlocks that slice their layers
    (``in_layers[:-1]``) get this class again, so the fused path holds there too."""

    chunk_elements = lowmem.CHUNK_ELEMENTS

    def _fused(self, x) -> bool:  # whether the mode runs the GroupNorm and SiLU as one chunked pass
        mods = list(self._modules.values())
        return (len(mods) >= 2 and lowmem.is_enabled() and isinstance(mods[0], nn.GroupNorm)
                and type(mods[1]) is nn.SiLU and not _autograd_needs(x, mods[0]))

    def banded(self, x):
        """The convolution this Sequential ends with when the mode runs it by bands of rows for ``x``, else None."""
        mods = list(self._modules.values())
        if (self._fused(x) and len(mods) >= 3 and all(_is_identity(m) for m in mods[2:-1])
                and _bandable_input(x, BAND_ELEMENTS)):
            return banded_conv(mods[-1])
        return None

    def forward(self, x):
        """``x``: a tensor, or (from our ResBlock) a ``lowmem.ConcatParts``, read by bands where it is banded."""
        if self._fused(x):
            mods = list(self._modules.values())
            gn = mods[0]
            _run_every_op()
            conv = self.banded(x)
            if conv is not None:  # GroupNorm -> SiLU -> conv by bands of rows: no full-size normalised input
                like = _tensor(x)
                with weight_and_bias(gn, like) as (w, b):
                    scale, shift = lowmem.group_norm_scale_shift(x, gn.num_groups, _as(w, like), _as(b, like),
                                                                 gn.eps, self.chunk_elements)
                with weight_and_bias(conv, like) as (cw, cb):
                    return lowmem.norm_silu_conv2d(x, scale, shift, cw, cb, conv.padding, BAND_ELEMENTS)
            x = _whole(x)
            with weight_and_bias(gn, x) as (w, b):
                if w is not None and w.dtype != x.dtype:
                    w = w.to(x.dtype)
                if b is not None and b.dtype != x.dtype:
                    b = b.to(x.dtype)
                x = lowmem.group_norm_silu(x, gn.num_groups, w, b, gn.eps, self.chunk_elements)
            for m in mods[2:]:
                x = m(x)
            return x
        return super().forward(_whole(x))


def _run_every_op():
    """ComfyUI's per-op hook (0.33+: interrupt checks and the like), as its own ops call it before each op."""
    if hasattr(comfy.ops, "run_every_op"):
        comfy.ops.run_every_op()


def _as(t, like):
    return t if t is None or t.dtype == like.dtype else t.to(like.dtype)


def _whole(x) -> torch.Tensor:
    """``x`` as a tensor: a ``lowmem.ConcatParts`` made whole."""
    return x.full() if isinstance(x, lowmem.ConcatParts) else x


def _tensor(x) -> torch.Tensor:
    """A tensor of ``x``'s dtype and device (for ComfyUI's weight casting)."""
    return x.parts[0] if isinstance(x, lowmem.ConcatParts) else x


def _is_identity(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0 or not m.training))


def _bandable_input(x: torch.Tensor, band_elements: int) -> bool:
    return x.dim() == 4 and x.is_contiguous() and x.numel() > 2 * band_elements


def banded_conv(conv: nn.Module):
    """``conv`` when the low-memory mode can run it by bands of rows (a plain 2-D convolution, stride 1, zero
    'same' padding, ComfyUI's or torch's forward), else None."""
    if not _fresh_conv_output(conv):
        return None
    k, p = conv.kernel_size, conv.padding
    if (isinstance(p, str) or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
            or conv.padding_mode != "zeros" or any(kk != 2 * pp + 1 for kk, pp in zip(k, p))):
        return None
    return conv


def _conv_forwards():
    """The forwards of the 2-D convolutions whose whole work is ``conv2d(x, weight, bias)`` with ComfyUI's weight
    handling (torch's, and those of ComfyUI's ops classes): anything else (another pack's conv) runs as it is."""
    fs = {nn.Conv2d.forward}
    for name in dir(comfy.ops):
        ops = getattr(comfy.ops, name)
        conv = getattr(ops, "Conv2d", None) if isinstance(ops, type) else None
        if isinstance(conv, type) and issubclass(conv, nn.Conv2d):
            fs.add(conv.forward)
    return fs


_CONV_FORWARDS = _conv_forwards()


# -- Upsample: nearest resize + conv ----------------------------------------------------------------------------------

def _same_children(cls, module: nn.Module, share: bool = False) -> nn.Module:
    """An instance of ``cls`` (a subclass of ``type(module)``) over ``module``'s children, parameters, buffers and
    plain attributes, without running ``__init__``: the same weights under the same names. ``share``: the very
    same children dict, so that an object patch under it lands in both, whichever is applied first."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in module.__dict__.items():
        if not k.startswith("_"):
            new.__dict__[k] = v
    if share:
        new._modules = module._modules
    for table in ("_parameters", "_buffers") if share else ("_modules", "_parameters", "_buffers"):
        getattr(new, table).update(getattr(module, table))
    return new


_BANDED_UPSAMPLE = {}
_BANDED_RESBLOCK = {}


def is_banded_upsample(module) -> bool:
    """Whether ``module`` is one of our banded upsamplers (``banded_upsample_class``)."""
    return type(module) in _BANDED_UPSAMPLE.values()


def is_banded_resblock(module) -> bool:
    """Whether ``module`` is one of our ResBlocks (``banded_resblock_class``)."""
    return type(module) in _BANDED_RESBLOCK.values()


def banded_upsample_class(base: type) -> type:
    """A subclass of ComfyUI's ``Upsample`` (so the UNet still hands it the output shape) whose nearest resize and
    convolution run by bands of rows while the low-memory mode is on (``lowmem.upsample_conv2d``): the resized
    input never exists at full size. Otherwise exactly the base's forward."""
    if base not in _BANDED_UPSAMPLE:
        class BandedUpsample(base):
            def forward(self, x, output_shape=None, *args, **kwargs):
                if (lowmem.is_enabled() and not args and not kwargs and self.dims == 2 and self.use_conv
                        and not torch.is_grad_enabled() and x.dim() == 4 and x.is_contiguous()):
                    size = (x.shape[2] * 2, x.shape[3] * 2) if output_shape is None else tuple(output_shape[2:4])
                    conv = banded_conv(self.conv)
                    if conv is not None and x.shape[0] * x.shape[1] * size[0] * size[1] > 2 * BAND_ELEMENTS:
                        _run_every_op()
                        with weight_and_bias(conv, x) as (cw, cb):
                            return lowmem.upsample_conv2d(x, size, cw, cb, conv.padding, BAND_ELEMENTS)
                return super().forward(x, output_shape, *args, **kwargs)

        BandedUpsample.__name__ = BandedUpsample.__qualname__ = "Banded" + base.__name__
        _BANDED_UPSAMPLE[base] = BandedUpsample
    return _BANDED_UPSAMPLE[base]


def upsample_paths(diffusion_model: nn.Module) -> list:
    """Paths (under diffusion_model) of the UNet's 2-D upsamplers with a convolution: ComfyUI's own class only (an
    upsampler another pack put in its place keeps its own behaviour)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample
    # (ours in place while a patched copy is loaded: the tree shows ours)
    return [name for name, mod in diffusion_model.named_modules()
            if (type(mod) is Upsample or is_banded_upsample(mod)) and getattr(mod, "use_conv", False)
            and getattr(mod, "dims", 2) == 2]


# -- ResBlock: its sums in place -------------------------------------------------------------------------------------

def _fresh_conv_output(module: nn.Module) -> bool:
    """Whether ``module(x)`` returns a tensor nobody else holds: torch's or ComfyUI's 2-D convolution."""
    return type(module).forward in _CONV_FORWARDS


def resblock_in_place(block, x, emb: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``ResBlock._forward`` (no up/down-sampling, no scale-shift norm) with its two sums in place: the
    time embedding is added into the fresh output of ``in_layers``, and that of ``out_layers`` into the skip
    connection's fresh output (or the input into it, for an identity skip). The same sums, the same bits (an
    addition is commutative); a block holds two block-sized tensors at most besides ``x`` where ComfyUI holds
    three. A skip convolution over two bands runs by bands of rows (``skip_conv``: otherwise oneDNN, on a CPU,
    copies all of ``x`` into its blocked layout for it; single-threaded the same bits, see ``skip_conv``). Only for
    ``in_layers``/``out_layers`` that are ours (a fresh result) and a skip connection that is an identity or a
    plain convolution; ``BandedResBlock`` checks.

    ``x`` may come as a one-element list holding the decoder's concatenation, which nobody else holds: a
    ``lowmem.ConcatParts`` (its two parts), read by bands by the skip convolution and ``in_layers`` when both run
    by bands, so it never exists at full size, else made whole here. The skip convolution runs first, and the
    input is released as soon as ``in_layers`` has read it, before ``out_layers`` runs. The same operations on
    the same values."""
    owned = isinstance(x, list)
    if owned:
        x = x.pop()
    skip = block.skip_connection
    if isinstance(x, lowmem.ConcatParts) and (block.in_layers.banded(x) is None or _skip_banded(skip, x) is None):
        x = x.full()  # not read by bands all through: made whole (still ours to release early)
    y = None
    if owned and not isinstance(skip, nn.Identity):
        y = skip_conv(skip, x)
    h = block.in_layers(x)
    if y is not None:
        del x
    if not block.skip_t_emb:
        emb_out = block.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if block.exchange_temb_dims:
            emb_out = emb_out.movedim(1, 2)
        if torch.broadcast_shapes(h.shape, emb_out.shape) == h.shape:
            h.add_(emb_out)  # h + emb_out
        else:
            h = h + emb_out
        del emb_out
    h = block.out_layers(h)
    if y is None:
        if isinstance(skip, nn.Identity):
            if h.shape == x.shape and h.dtype == x.dtype:
                return h.add_(x)  # x + h
            return x + h
        y = skip_conv(skip, x)
    if y.shape == h.shape and y.dtype == h.dtype:
        return y.add_(h)  # skip(x) + h
    return y + h


def _skip_banded(skip: nn.Module, x):
    return banded_conv(skip) if _bandable_input(x, BAND_ELEMENTS) else None


def skip_conv(skip: nn.Module, x) -> torch.Tensor:
    """A ResBlock's skip convolution (1x1 where the channels change) by bands of rows when its input is over two
    bands (``x`` a tensor or a ``lowmem.ConcatParts``): the convolution's working copies (on a CPU, oneDNN's blocked
    copy of the whole input, three times the block's output for a decoder block's concatenation) are one band's.
    Otherwise ``skip(x)``.

    Not always the same bits as the whole convolution: single-threaded it is (oneDNN sums each output pixel the
    same way for a band as for the whole tensor), but with several threads oneDNN splits a band's work otherwise
    than the whole tensor's for some shapes (measured on this 2-core CPU: 1920 -> 640 channels at 64 px wide,
    bands of 16 K px; never at the 16K image's widths of 1024 and 2048 px with the default bands). Stock ComfyUI
    itself moves as much between thread counts: a whole SD-1.5 UNet step, 1 thread against 2, 1.0e-6 relative;
    mode on against off with the smallest bands, 9e-7."""
    conv = _skip_banded(skip, x)
    if conv is None:
        return skip(x)
    with weight_and_bias(conv, _tensor(x)) as (cw, cb):
        return lowmem.conv2d_rows(x, cw, cb, conv.padding, BAND_ELEMENTS)


def banded_resblock_class(base: type) -> type:
    """A subclass of ComfyUI's ``ResBlock`` whose ``_forward``, while the low-memory mode is on and autograd is off,
    is ``resblock_in_place``; otherwise, or for a block that up- or down-samples, uses the scale-shift norm, or
    has children another pack replaced, exactly the base's."""
    if base not in _BANDED_RESBLOCK:
        class BandedResBlock(base):
            def _forward(self, x, emb, *args, **kwargs):
                pending = type(x) is lowmem.PendingConcat
                if pending:  # the decoder's concatenation, ours to read by bands (or to make); held only by this
                    x = [x.take_parts()]  # list, so it can go
                if self._in_place(x[0] if pending else x, args, kwargs):
                    _run_every_op()
                    return resblock_in_place(self, x, emb)
                return super()._forward(x.pop().full() if pending else x, emb, *args, **kwargs)

            def _in_place(self, x, args, kwargs) -> bool:  # whether resblock_in_place runs this call
                return (lowmem.is_enabled() and not args and not kwargs and not self.updown
                        and not self.use_scale_shift_norm and not torch.is_grad_enabled() and x.dim() == 4
                        and type(self.in_layers) is NormActSequential and type(self.out_layers) is NormActSequential
                        and (isinstance(self.skip_connection, nn.Identity)
                             or _fresh_conv_output(self.skip_connection)))

        BandedResBlock.__name__ = BandedResBlock.__qualname__ = "Banded" + base.__name__
        _BANDED_RESBLOCK[base] = BandedResBlock
    return _BANDED_RESBLOCK[base]


def _banded_resblock(block: nn.Module) -> nn.Module:
    """Our ResBlock over ``block``'s children, with NormActSequentials over its in and out layers."""
    new = _same_children(banded_resblock_class(_resblock_class()), block)
    for part in ("in_layers", "out_layers"):
        new._modules[part] = NormActSequential(OrderedDict(block._modules[part]._modules))
    return new


def _resblock_class():
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    return ResBlock


# -- transformer blocks in token chunks -----------------------------------------------------------------------------

# the patches a BasicTransformerBlock runs inside itself: with any of them the block runs as ComfyUI's
_BLOCK_PATCHES = ("attn1_patch", "attn1_output_patch", "middle_patch", "attn2_patch", "attn2_output_patch")


def _block_class():
    from comfy.ldm.modules.attention import BasicTransformerBlock
    return BasicTransformerBlock


def chunkable_block(block, x: torch.Tensor, transformer_options: dict) -> bool:
    """Whether the low-memory mode can run ``block`` (ComfyUI's BasicTransformerBlock over ``x``) in token chunks:
    a plain block (no ``ff_in``, self-attention attn1 that is our LinFusion layer running linear at this size, a
    cross-attention attn2, a residual feed-forward), no patch that runs inside a block, no attention replacement,
    autograd off, and more than two chunks of tokens."""
    attn1 = getattr(block, "attn1", None)
    if (type(block) is not _block_class() or not isinstance(attn1, LinFusionAttention) or block.ff_in
            or block.disable_self_attn or block.switch_temporal_ca_to_sa or block.attn2 is None
            or not block.is_res or x.dim() != 3 or torch.is_grad_enabled()
            or runs_softmax(x.shape[1], attn1.softmax_below_tokens)
            or x.numel() <= 2 * attn1.chunk_elements):
        return False
    patches = transformer_options.get("patches", {}) or {}
    replace = transformer_options.get("patches_replace", {}) or {}
    return not any(patches.get(k) for k in _BLOCK_PATCHES) and not replace.get("attn1") and not replace.get("attn2")


def transformer_block_in_chunks(block, x: torch.Tensor, context, transformer_options: dict) -> torch.Tensor:
    """ComfyUI's ``BasicTransformerBlock.forward`` (for blocks ``chunkable_block`` accepts) over chunks of tokens.
    Every part but attn1's sums works token by token: pass 1 runs ``norm1`` chunk by chunk into the LinFusion
    layer's key sums; pass 2 runs each chunk through ``norm1``, attn1 from those sums, its residual add,
    ``norm2``, the cross-attention against the text, its residual add, ``norm3``, the feed-forward and its
    residual add, into the output. The block holds its input, its output and one chunk's temporaries, where
    ComfyUI holds about five tensors of the input's size; ``x`` is never written."""
    attn1 = block.attn1
    B, N, C = x.shape
    T, L = attn1.chunk_plan(B, N, N, C)

    def normed(s):
        n = block.norm1(x[:, s:s + L].contiguous())
        return n, n
    state = attn1.key_state((normed(s) for s in range(0, N, L)), N, N, T)
    out = None
    for s in range(0, N, L):
        xc = x[:, s:s + L].contiguous()
        n = attn1.query_chunk(block.norm1(xc), state, T)
        xc = n + xc
        n = block.attn2(block.norm2(xc), context=context, value=None, transformer_options=transformer_options)
        xc = n + xc
        del n
        xc = xc + block.ff(block.norm3(xc))
        if out is None:
            out = xc.new_empty(B, N, xc.shape[-1])
        out[:, s:s + L] = xc
        del xc
    return out


class _ChunkedBlockCall:
    """What a SpatialTransformer iterating our block list calls in place of a block: the block in token chunks
    when ``chunkable_block`` allows, otherwise the block itself. Attributes read through to the block."""

    __slots__ = ("block",)

    def __init__(self, block):
        self.block = block

    def __call__(self, x, context=None, transformer_options={}, *args, **kwargs):
        if not args and not kwargs and chunkable_block(self.block, x, transformer_options):
            _run_every_op()
            return transformer_block_in_chunks(self.block, x, context, transformer_options)
        return self.block(x, *args, context=context, transformer_options=transformer_options, **kwargs)

    def __getattr__(self, name):
        return getattr(self.block, name)


class ChunkedBlockList(nn.ModuleList):
    """A SpatialTransformer's ``transformer_blocks``, the same list (the same children dict: the blocks, and any
    object patch under them, whichever is applied first). ComfyUI's SpatialTransformer runs its blocks by
    iterating this list: while the low-memory mode is on and autograd is off, iterating yields callers that run
    each block in token chunks where it can (``transformer_block_in_chunks``); otherwise the blocks themselves."""

    def __iter__(self):
        blocks = super().__iter__()
        if lowmem.is_enabled() and not torch.is_grad_enabled():
            return (_ChunkedBlockCall(b) for b in blocks)
        return blocks


def transformer_block_lists(diffusion_model: nn.Module) -> list:
    """Paths (under diffusion_model) of the ``transformer_blocks`` lists of ComfyUI's own SpatialTransformers."""
    from comfy.ldm.modules.attention import SpatialTransformer
    return [f"{name}.transformer_blocks" for name, mod in diffusion_model.named_modules()
            if type(mod) is SpatialTransformer and isinstance(getattr(mod, "transformer_blocks", None), nn.ModuleList)]


def resblock_paths(diffusion_model: nn.Module) -> list:
    """Paths (under diffusion_model) of the ``in_layers`` / ``out_layers`` of every ResBlock."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    out = []
    for name, mod in diffusion_model.named_modules():
        if isinstance(mod, ResBlock):
            for part in ("in_layers", "out_layers"):
                seq = getattr(mod, part, None)
                if isinstance(seq, nn.Sequential) and len(seq) >= 2:
                    out.append(f"{name}.{part}")
    return out


def patch_resblocks(model_patcher) -> int:
    """Object patches: our ResBlock (``banded_resblock_class``, its in/out layers NormActSequentials) over each of
    ComfyUI's own ResBlocks; a NormActSequential over the in/out layers of any other ResBlock (a subclass, or one
    another pack put in place); a banded upsampler over each Upsample. One patch per ResBlock, never one on a
    ResBlock and one on its child: ComfyUI restores object patches one by one, and a child restored after its
    parent would land on the original module. None over a block with another pack's object patch on a part of it
    (logged). Returns how many patches."""
    dm = model_patcher.get_model_object("diffusion_model")
    ResBlock = _resblock_class()
    n = 0
    whole = set()
    # Another pack's object patch on a part of a block (set before ours: ComfyUI applies object patches in the order
    # they were added) would land in the module ours replaces, and be hidden: such blocks keep ComfyUI's modules.
    theirs = [k for k in model_patcher.object_patches if k.startswith("diffusion_model.")]
    kept = []

    def free(key: str) -> bool:
        if any(k.startswith(key + ".") for k in theirs):
            if not any(key.startswith(k + ".") for k in kept):  # (a block's in_layers after the block itself)
                kept.append(key)
            return False
        return True
    for name, mod in dm.named_modules():
        if type(mod) is ResBlock or is_banded_resblock(mod):
            key = f"diffusion_model.{name}"
            block = model_patcher.get_model_object(key)  # another pack's object patch may stand here: leave it be
            if (type(block) is ResBlock or is_banded_resblock(block)) and free(key):
                model_patcher.add_object_patch(key, _banded_resblock(block))
                whole.add(name)
                n += 1
    for path in resblock_paths(dm):
        if path.rsplit(".", 1)[0] in whole:
            continue
        key = f"diffusion_model.{path}"
        if not free(key):
            continue
        seq = model_patcher.get_model_object(key)
        model_patcher.add_object_patch(key, NormActSequential(OrderedDict(seq._modules)))
        n += 1
    for path in transformer_block_lists(dm):
        key = f"diffusion_model.{path}"
        blocks = model_patcher.get_model_object(key)
        if type(blocks) in (nn.ModuleList, ChunkedBlockList):
            model_patcher.add_object_patch(key, _same_children(ChunkedBlockList, blocks, share=True))
            n += 1
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample
    for path in upsample_paths(dm):
        key = f"diffusion_model.{path}"
        up = model_patcher.get_model_object(key)  # another pack's object patch may stand here: leave it be
        if (type(up) is Upsample or is_banded_upsample(up)) and free(key):
            model_patcher.add_object_patch(key, _same_children(banded_upsample_class(Upsample), up))
            n += 1
    if kept:
        log.info("LinFusion low-memory mode: %d block(s) run whole, as ComfyUI's, because another node patched a "
                 "part of them (%s): the same result, less memory saved there", len(kept), ", ".join(kept))
    return n


def _on_multigpu_clone(src, clone):
    """ComfyUI 0.33+ multi-GPU copies: our modules hold the first copy's layers; rebuild them over the copy's."""
    import comfy.utils
    for key, obj in src.object_patches.items():
        if isinstance(obj, NormActSequential):
            here = comfy.utils.get_attr(clone.model, key)
            clone.add_object_patch(key, NormActSequential(OrderedDict(here._modules)))
        elif is_banded_upsample(obj):
            here = comfy.utils.get_attr(clone.model, key)
            clone.add_object_patch(key, _same_children(type(obj), here))
        elif is_banded_resblock(obj):
            clone.add_object_patch(key, _banded_resblock(comfy.utils.get_attr(clone.model, key)))
        elif isinstance(obj, ChunkedBlockList):
            clone.add_object_patch(key, _same_children(ChunkedBlockList, comfy.utils.get_attr(clone.model, key), share=True))


# -- the per-call switch and the skip tensors ------------------------------------------------------------------------

def needs_low_memory(base_model, input_shape) -> bool:
    """Whether a step of ``input_shape`` would not fit in free memory without the mode, by the model's estimate."""
    est = base_model.memory_required
    needed = getattr(est, "low_memory_needed", None)
    if needed is not None:
        return bool(needed(list(input_shape)))
    import comfy.model_management as mm
    return est(list(input_shape)) > mm.get_free_memory(mm.get_torch_device())


class _SkipOffload:
    """One UNet call's patches: park each skip, keep the device tensor flowing, bring skips back and add the
    ControlNet's output residuals to them."""

    def __init__(self, parking: lowmem.SkipParking, control, diffusion_model=None):
        self.parking = parking
        self.diffusion_model = diffusion_model
        self.device_h = None
        self.residuals = None
        if control is not None and control.get("output"):
            # ComfyUI pops one entry per output block and adds it to the (parked) skip: give it Nones instead and
            # add the real ones in output_block_patch. Popping the original list frees each residual when used,
            # as ComfyUI does.
            self.residuals = control["output"]
            control = dict(control)
            control["output"] = [None] * len(self.residuals)
        self.control = control

    def park(self, h, transformer_options):
        self.device_h = h
        return self.parking.park(h)

    def hand_on(self, h, transformer_options):
        if self.device_h is not None and len(self.parking) and self.parking._stack[-1][0] is h:
            h, self.device_h = self.device_h, None
        return h

    def bring_back(self, h, hsp, transformer_options):
        hsp = self.parking.fetch(hsp)
        if self.residuals:
            ctrl = self.residuals.pop()
            if ctrl is not None:  # comfy's apply_control(hsp, control, 'output'), on the device copy
                try:
                    hsp += ctrl
                except Exception:
                    logging.warning("warning control could not be applied {} {}".format(hsp.shape, ctrl.shape))
        return h, hsp

    def defer_concat(self, h, hsp, transformer_options):
        """Last of the output block patches: when the block's first layer is our ResBlock, hand the UNet a
        stand-in for ``cat([h, hsp])`` (``lowmem.PendingConcat``) and a part with no channels to concatenate it
        with; the ResBlock reads it from its parts (or makes it) and releases them once read, where the UNet
        would hold it through the whole output block. Only while it is the last of the patches (one that another wrapper added
        after it would get the stand-in)."""
        kind, index = transformer_options.get("block", (None, None))
        blocks = getattr(self.diffusion_model, "output_blocks", None)
        patches = transformer_options.get("patches") or {}
        chain = patches.get("output_block_patch") or []
        if not (kind == "output" and blocks is not None and isinstance(index, int) and 0 <= index < len(blocks)
                and len(blocks[index]) and chain and chain[-1] == self.defer_concat):
            return h, hsp
        first = blocks[index][0]
        if (is_banded_resblock(first) and hsp is not None and lowmem.PendingConcat.can_stand_for(h, hsp)
                and not any(isinstance(first, cls)  # (0.33+: a handler would run in the ResBlock's place)
                            for cls, _ in patches.get("forward_timestep_embed_patch") or [])):
            return lowmem.PendingConcat(h, hsp), h.new_empty((h.shape[0], 0) + tuple(h.shape[2:]))
        return h, hsp

    def options(self, transformer_options: dict) -> dict:
        to = dict(transformer_options)
        patches = {k: list(v) for k, v in to.get("patches", {}).items()}
        patches["input_block_patch"] = patches.get("input_block_patch", []) + [self.park]
        patches["input_block_patch_after_skip"] = [self.hand_on] + patches.get("input_block_patch_after_skip", [])
        patches["output_block_patch"] = [self.bring_back] + patches.get("output_block_patch", []) + [self.defer_concat]
        to["patches"] = patches
        return to


class LowMemoryWrapper:
    """APPLY_MODEL wrapper: runs the call in the low-memory mode when ``mode`` says so. Holds only the mode
    (ComfyUI 0.3.75 deep-copies model options on every clone)."""

    def __init__(self, mode: str):
        self.mode = normalize_mode(mode)

    def active(self, base_model, x) -> bool:
        return self.mode == "on" or (self.mode == "auto" and needs_low_memory(base_model, x.shape))

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        if not self.active(executor.class_obj, x):
            with lowmem.enabled(False):
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        parking = lowmem.SkipParking(x.device, host_alloc=HOST_ALLOC)
        offload = _SkipOffload(parking, control, getattr(executor.class_obj, "diffusion_model", None))
        try:
            with lowmem.enabled(True):
                return executor(x, t, c_concat, c_crossattn, offload.control, offload.options(transformer_options),
                                **kwargs)
        finally:
            parking.clear()


def install(model_patcher, mode="auto") -> str:
    """Install the low-memory mode on ``model_patcher`` (a patched clone): nothing for "off"; the ResBlock patches
    and the APPLY_MODEL wrapper for "auto" and "on". The estimate is installed by nodes/memory.py with the same
    mode. Returns the mode."""
    import comfy.patcher_extension as pe
    mode = normalize_mode(mode)
    model_patcher.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, KEY)
    if mode == "off":
        return mode
    patch_resblocks(model_patcher)
    model_patcher.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, KEY, LowMemoryWrapper(mode))
    call_type = getattr(pe.CallbacksMP, "ON_DEEPCLONE_MULTIGPU", None)  # ComfyUI 0.33+
    if call_type is not None:
        model_patcher.remove_callbacks_with_key(call_type, KEY)
        model_patcher.add_callback_with_key(call_type, KEY, _on_multigpu_clone)
    return mode


# -- the mode-aware memory estimate ----------------------------------------------------------------------------------

def mode_aware_estimate(estimate, mode: str, model_patcher):
    """``memory_required(input_shape, cond_shapes={}, low_memory=None)`` over ``estimate(input_shape, cond_shapes,
    low)`` (the patched model's lines without / with the mode) for ``mode`` "on" or "auto" (see the module
    docstring). ``low_memory`` True/False asks for one line. ``.low_memory_needed(shape)`` is the auto switch."""
    mode = normalize_mode(mode)
    base = model_patcher.model
    device = model_patcher.load_device
    weights = int(model_patcher.model_size())

    def free_for_activations() -> float:
        import comfy.model_management as mm
        loaded = int(getattr(base, "model_loaded_weight_memory", 0) or 0)
        return mm.get_free_memory(device) - max(0, weights - loaded)

    def low_memory_needed(input_shape, cond_shapes={}) -> bool:
        return estimate(input_shape, cond_shapes, False) > free_for_activations()

    def memory_required(input_shape, cond_shapes={}, low_memory=None):
        if low_memory is not None:
            return estimate(input_shape, cond_shapes, bool(low_memory))
        if mode == "on":
            return estimate(input_shape, cond_shapes, True)
        off = estimate(input_shape, cond_shapes, False)
        free = free_for_activations()
        if off <= free:
            return off
        if input_shape[0] > 1 and estimate([input_shape[0] // 2] + list(input_shape[1:]), {}, False) <= free:
            return off  # ComfyUI halves the batch (cond, then uncond) and each half runs without the mode
        return estimate(input_shape, cond_shapes, True)

    memory_required.low_memory_needed = low_memory_needed
    memory_required.low_memory = mode
    return memory_required
