"""One-pass tiled VAE decode and encode with exact global GroupNorm statistics and convolution halos.

Works on the KL autoencoder of SD-1.x, SD-2.x and SD-XL as ComfyUI builds it
(``comfy.ldm.modules.diffusionmodules.model.Decoder`` / ``Encoder``, 2-D, no attention inside the levels), by walking
its modules: ``conv_in``, ``mid.block_1/attn_1/block_2``, ``up[i].block[j]`` + ``up[i].upsample`` (decoder),
``down[i].block[j]`` + ``down[i].downsample`` (encoder), ``norm_out``, ``conv_out``, plus the autoencoder's
``post_quant_conv`` / ``quant_conv``. Plain PyTorch: nothing here imports ComfyUI; its modules are only called.

How it stays equal to the untiled network
- Activations are kept as whole feature maps ("parked": on the CPU when the network runs on a GPU) and computed
  tile by tile between GroupNorms. Each tile is read with a halo (1 pixel per 3x3 convolution it passes through,
  more for the fused upsampler) and only its core is written back, so every convolution sees exactly what it sees
  untiled; at the image border the convolution's own zero padding is the untiled padding.
- Every GroupNorm uses the statistics of the whole image: while a map is written, each tile's per-group mean and
  sum of squared deviations are merged (Chan's parallel formula, float64); the norm is applied with them, in float32,
  as one per-channel scale and shift.
- The only approximation is the mid-block self-attention, computed per attention tile: the queries of a core of
  ``attention_tile`` image pixels (default twice ``tile``: the attention runs on the 8x smaller latent grid, where a
  window that size needs about the device memory of one convolution tile) attend to keys and values of that core
  plus ``overlap`` context on each side. When the whole latent fits one attention tile, the result equals the
  untiled VAE to float tolerance.

What is kept (per image of a batch; batches run one image at a time): within a ResNet block, its input (or, when the
block changes channels or follows an upsampler, its shortcut) and the first convolution's output, i.e. two maps of
the block's level. The largest are at full resolution: 2 x 128 channels x H x W in the VAE's dtype (about 69 GB for a
16384x8192 image in fp16/bf16), 2.5 x that while the decoder's last upsampler feeds the first full-resolution block
(the 256-channel upsampled map is never stored: its statistics come from a first sweep and it is recomputed per
tile). ``plan()`` gives the figure for any size without allocating. Device memory is bounded by one tile.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["decode", "encode", "plan", "check_supported", "UnsupportedVAE"]


class UnsupportedVAE(ValueError):
    """The autoencoder is not the 2-D KL VAE of SD-1.x/2.x/SD-XL that this module knows how to tile."""


class _Overflow(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------- structure


def _is_resblock(m) -> bool:
    return all(hasattr(m, a) for a in ("norm1", "conv1", "norm2", "conv2", "in_channels", "out_channels"))


def _is_attnblock(m) -> bool:
    return all(hasattr(m, a) for a in ("norm", "q", "k", "v", "proj_out"))


def _check_net(net, kind: str) -> None:
    name = type(net).__name__
    if not all(hasattr(net, a) for a in ("conv_in", "mid", "norm_out", "conv_out", "num_resolutions", "num_res_blocks")):
        raise UnsupportedVAE(f"{kind} {name} is not the KL-autoencoder {kind} of SD-1.x/2.x/SD-XL")
    if getattr(net, "give_pre_end", False):
        raise UnsupportedVAE(f"{kind} {name} has give_pre_end set")
    if getattr(net, "carried", False) or not isinstance(net.conv_in, torch.nn.Conv2d):
        raise UnsupportedVAE(f"{kind} {name} is a video (3-D) {kind}")
    levels = net.up if kind == "decoder" else net.down
    blocks = [net.mid.block_1, net.mid.block_2] + [b for lv in levels for b in lv.block]
    for b in blocks:
        if not _is_resblock(b) or type(b).__name__ != "ResnetBlock":
            raise UnsupportedVAE(f"{kind} {name} has a {type(b).__name__} where a ResnetBlock was expected")
        if hasattr(b, "temb_proj"):
            raise UnsupportedVAE(f"{kind} {name}: ResNet blocks with a time embedding are not supported")
    for i, lv in enumerate(levels):
        if len(lv.attn) > 0:
            raise UnsupportedVAE(f"{kind} {name} has attention at level {i} (only the mid-block attention is supported)")
        res = getattr(lv, "upsample", None) if kind == "decoder" else getattr(lv, "downsample", None)
        if res is not None and (not getattr(res, "with_conv", False) or not isinstance(res.conv, torch.nn.Conv2d)):
            raise UnsupportedVAE(f"{kind} {name}: level {i} resamples without a 2-D convolution")
        if res is not None and kind == "decoder":
            sf = res.scale_factor
            if (sf if isinstance(sf, (int, float)) else max(sf)) != 2:
                raise UnsupportedVAE(f"{kind} {name}: level {i} upsamples by {sf}, not 2")


def check_supported(first_stage_model, what: str = "both") -> None:
    """Raise UnsupportedVAE (a ValueError) with the reason when ``first_stage_model`` cannot be tiled here."""
    m = first_stage_model
    if m is None:
        raise UnsupportedVAE("the VAE has no model (the checkpoint contains no valid VAE)")
    if getattr(m, "bn", None) is not None:
        raise UnsupportedVAE(f"{type(m).__name__} with a batch-norm latent is not supported")
    if what in ("both", "decode"):
        if not hasattr(m, "decoder"):
            raise UnsupportedVAE(f"{type(m).__name__} has no decoder")
        _check_net(m.decoder, "decoder")
    if what in ("both", "encode"):
        if not hasattr(m, "encoder"):
            raise UnsupportedVAE(f"{type(m).__name__} has no encoder")
        _check_net(m.encoder, "encoder")
        reg = getattr(m, "regularization", None)
        if type(reg).__name__ != "DiagonalGaussianRegularizer" or getattr(reg, "sample", False):
            raise UnsupportedVAE(f"{type(m).__name__}: only the Gaussian posterior's mode is supported as the latent "
                                 f"(regularizer {type(reg).__name__})")


# --------------------------------------------------------------------------------------------------- statistics


class _Stats:
    """Per-group count, mean and sum of squared deviations over the tiles of one map, merged in float64."""

    def __init__(self, groups: int, device, planning: bool):
        self.groups, self.n, self.planning = groups, 0, planning
        acc = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.mean = torch.zeros(groups, dtype=acc, device=device)
        self.m2 = torch.zeros(groups, dtype=acc, device=device)

    def add(self, t: torch.Tensor) -> None:
        if self.planning:
            return
        # Per channel first (mean and biased variance), then channels into groups (float64). On CPU and CUDA,
        # torch.batch_norm_update_stats: a two-pass per-channel kernel (accumulating in double on a CPU), one read of
        # a strided tile, no temporaries; in float32, since it rounds its results to the input's dtype.
        C = t.shape[1]
        n_c = t.shape[0] * t.shape[2] * t.shape[3]
        if t.device.type == "cpu" and C > 1 and t.stride(1) == 1:  # channels-last (NHWC)
            mean_c, m2_c = _nhwc_moments(t)
        elif t.device.type in ("cpu", "cuda"):
            mean_c, var_c = torch.batch_norm_update_stats(t if t.dtype == torch.float32 else t.float(), None, None,
                                                          0.0)
            m2_c = var_c * n_c
        else:  # the corrected two-pass algorithm by hand, a few channels at a time
            mean_c = t.sum(dim=(0, 2, 3), dtype=torch.float32) / n_c
            m2_c = torch.empty_like(mean_c)
            for c0 in range(0, C, 4):
                d = t[:, c0:c0 + 4].float() - mean_c[c0:c0 + 4].view(1, -1, 1, 1)
                s1 = d.sum(dim=(0, 2, 3))
                m2_c[c0:c0 + 4] = d.square_().sum(dim=(0, 2, 3)) - s1 * s1 / n_c
        mean_c = mean_c.to(self.mean.dtype).view(self.groups, -1)
        m2_c = m2_c.to(self.mean.dtype).view(self.groups, -1)
        mean = mean_c.mean(1)
        m2 = m2_c.sum(1) + n_c * ((mean_c - mean[:, None]) ** 2).sum(1)
        n = n_c * mean_c.shape[1]
        tot = self.n + n
        delta = mean - self.mean
        self.mean += delta * (n / tot)
        self.m2 += m2 + delta * delta * (self.n * n / tot)
        self.n = tot

    def affine(self, weight, bias, eps: float, channels: int):
        """Per-channel (scale, shift) in float32 so that norm(x) = x * scale + shift with the global statistics."""
        if self.planning:
            z = torch.zeros(channels, dtype=torch.float32, device=self.mean.device)
            return z, z
        var = self.m2 / max(self.n, 1)
        if not (torch.isfinite(self.mean).all() and torch.isfinite(var).all()):
            raise _Overflow()
        rstd = torch.rsqrt(var + eps)
        per = channels // self.groups
        rstd_c = rstd.repeat_interleave(per)
        mean_c = self.mean.repeat_interleave(per)
        w = weight.to(self.mean) if weight is not None else torch.ones_like(rstd_c)
        b = bias.to(self.mean) if bias is not None else torch.zeros_like(rstd_c)
        scale = rstd_c * w
        shift = b - mean_c * scale
        return scale.float(), shift.float()


def _nhwc_moments(t: torch.Tensor, rows: int = 4):
    """Per-channel mean and sum of squared deviations (float64) of a channels-last tile, which may be a strided view
    of a map. Each image row of the tile is one contiguous run of width x channels values, so the tile is a matrix
    of rows whose column sums are fast (torch's per-channel reductions over NHWC views are ~8x slower). Two passes,
    the second centred, with its first-order correction, a few rows at a time (in cache)."""
    p = t.permute(0, 2, 3, 1)
    N, h, w, C = p.shape
    n = N * h * w
    p2 = p.reshape(N * h, w * C)  # a view for an NHWC tile
    mean_c = p2.sum(0, dtype=torch.float32).view(w, C).double().sum(0) / n
    mrow = mean_c.float().repeat(w)
    s1 = torch.zeros(w * C, dtype=torch.float64, device=t.device)
    m2 = torch.zeros_like(s1)
    for r0 in range(0, N * h, rows):
        d = p2[r0:r0 + rows].float() - mrow
        s1 += d.sum(0)
        m2 += d.square_().sum(0)
    s1 = s1.view(w, C).sum(0)
    return mean_c, m2.view(w, C).sum(0) - s1 * s1 / n


def _module_params(norm, like: torch.Tensor):
    return norm.weight, norm.bias


# --------------------------------------------------------------------------------------------------- the runner


class _Runner:
    def __init__(self, device, dtype, park, tile: int, overlap: int, ch0: int, progress, norm_params,
                 attention, planning: bool, check_finite: bool):
        self.device, self.dtype, self.park = torch.device(device), dtype, torch.device(park)
        self.tile, self.overlap, self.ch0 = tile, overlap, ch0
        self.progress, self.norm_params = progress, norm_params or _module_params
        self.attention = attention or _softmax_attention
        self.planning, self.check_finite = planning, check_finite
        self.ticks = 0
        self.live = 0
        self.peak = 0
        self._scratch = None
        # On a CPU the activations are kept and computed channels-last (NHWC): oneDNN's convolutions run 1.1-1.65x
        # faster on NHWC input than on NCHW (measured at the VAE's shapes, 512-128 channels), and a tile of an NHWC
        # map is rows of contiguous pixels. CUDA keeps NCHW (not measured there).
        self.channels_last = self.device.type == "cpu" and self.park.type == "cpu"

    # maps ------------------------------------------------------------------------------------------------
    def new_map(self, c, h, w, dtype=None, device=None):
        """A whole-image map; the activations (not the final output) channels-last when ``self.channels_last``."""
        fmt = torch.channels_last if self.channels_last and device is None else torch.contiguous_format
        dtype = dtype or self.dtype
        t = torch.empty((1, c, h, w), dtype=dtype, device="meta" if self.planning else (device or self.park),
                        memory_format=fmt)
        self.live += t.numel() * t.element_size()
        self.peak = max(self.peak, self.live)
        return t

    def free(self, t):
        if t is not None:
            self.live -= t.numel() * t.element_size()

    def stats(self, norm):
        return _Stats(norm.num_groups, self.device, self.planning)

    def norm_fn(self, norm, st: _Stats, channels: int):
        """x -> silu(GroupNorm_global(x)) as a tile function (float32 inside, VAE dtype out)."""
        if self.planning:
            return None
        w, b = self.norm_params(norm, torch.empty((), dtype=self.dtype, device=self.device))
        scale, shift = st.affine(w, b, norm.eps, channels)
        scale, shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
        dtype = self.dtype

        def apply(x):
            return F.silu(self.scale_shift(x, scale, shift), inplace=True).to(dtype)
        return apply

    def scale_shift(self, x, scale, shift):
        """``x * scale + shift`` in float32 (a GroupNorm with global statistics), written into the scratch buffer."""
        return torch.addcmul(shift, x.float(), scale, out=self.scratch(x.shape))

    def scratch(self, shape):
        """A float32 buffer of ``shape`` on the device, reused from tile to tile: the normalised tile is written there
        instead of into a fresh allocation (on a CPU, the page faults of a new tile-sized tensor cost more than the
        arithmetic). One user at a time: the caller is done with it before the next tile."""
        n = math.prod(shape)
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = None
            self._scratch = torch.empty(n, dtype=torch.float32, device=self.device)
        if self.channels_last and len(shape) == 4:
            b, c, h, w = shape
            return self._scratch[:n].view(b, h, w, c).permute(0, 3, 1, 2)
        return self._scratch[:n].view(shape)

    def side(self, channels: int) -> int:
        """Tile side (in the level's own pixels) so a tile holds about as many values as a full-resolution tile."""
        s = self.tile * math.sqrt(self.ch0 / max(channels, self.ch0))
        return max(8, int(s) // 8 * 8)

    def tick(self):
        self.ticks += 1
        if self.progress is not None and not self.planning:
            self.progress(self.ticks)

    # sweeps ----------------------------------------------------------------------------------------------
    def sweep(self, src, scale: float, halo: int, fn, outs, side: int, core_arg: bool = False):
        """Run ``fn`` over the output grid. ``src``: input maps (1,C,Hi,Wi) at one resolution; ``outs``: list of
        (map or None, _Stats or None) at output resolution = input x ``scale`` (2, 1 or 1/2). ``fn`` gets each input
        region (core + ``halo`` input pixels, clipped to the image) on the device and returns one tensor per output,
        covering the region x ``scale``; the core is cut out, merged into the statistics and parked."""
        Hi, Wi = src[0].shape[-2:]
        Ho, Wo = round(Hi * scale), round(Wi * scale)
        for oy0 in range(0, Ho, side):
            for ox0 in range(0, Wo, side):
                oy1, ox1 = min(oy0 + side, Ho), min(ox0 + side, Wo)
                if self.planning:
                    self.tick()
                    continue
                iy0, iy1 = math.floor(oy0 / scale), math.ceil(oy1 / scale)
                ix0, ix1 = math.floor(ox0 / scale), math.ceil(ox1 / scale)
                ry0, ry1 = max(iy0 - halo, 0), min(iy1 + halo, Hi)
                rx0, rx1 = max(ix0 - halo, 0), min(ix1 + halo, Wi)
                tiles = [m[:, :, ry0:ry1, rx0:rx1].to(device=self.device, dtype=self.dtype) for m in src]
                cy, cx = round(oy0 - ry0 * scale), round(ox0 - rx0 * scale)
                if core_arg:  # fn returns the core only
                    res = fn(*tiles, core=(cy, cy + oy1 - oy0, cx, cx + ox1 - ox0))
                    cy = cx = 0
                else:
                    res = fn(*tiles)
                del tiles
                if not isinstance(res, (tuple, list)):
                    res = (res,)
                for (m, st), r in zip(outs, res):
                    core = r[:, :, cy:cy + oy1 - oy0, cx:cx + ox1 - ox0]
                    if st is not None:
                        st.add(core)
                    elif self.check_finite and not torch.isfinite(core).all():
                        raise _Overflow()
                    if m is not None:
                        m[:, :, oy0:oy1, ox0:ox1].copy_(core)
                del res
                self.tick()

    # blocks ----------------------------------------------------------------------------------------------
    def resblock(self, blk, holder, xst, next_norm, pre=None):
        """One ResnetBlock. ``holder``: a one-element list with the parked input map, which is consumed (taken out of
        the list so it can be freed while the block runs). ``pre``: an upsampler applied to x on the fly (its output
        is never stored). Returns (out map, stats of out for ``next_norm``)."""
        x = holder.pop()
        cin, cout = blk.in_channels, blk.out_channels
        H, W = x.shape[-2:]
        f = 2 if pre is not None else 1
        Ho, Wo = H * f, W * f
        if pre is not None:  # statistics of the upsampled map, which is recomputed below instead of stored
            ust = self.stats(blk.norm1)
            self.sweep([x], 2, 1, pre, [(None, ust)], self.side(cin))
            xst = ust
        n1 = self.norm_fn(blk.norm1, xst, cin)
        shortcut = getattr(blk, "conv_shortcut", None) if getattr(blk, "use_conv_shortcut", False) else \
            getattr(blk, "nin_shortcut", None)
        if cin == cout:
            shortcut = None
        h1 = self.new_map(cout, Ho, Wo)
        h1st = self.stats(blk.norm2)
        if pre is None and shortcut is None:
            s = x
            self.sweep([x], 1, 1, lambda t: blk.conv1(n1(t)), [(h1, h1st)], self.side(max(cin, cout)))
        else:
            s = self.new_map(cout, Ho, Wo)

            def seg_a(t):
                u = pre(t) if pre is not None else t
                h = blk.conv1(n1(u))
                return h, (shortcut(u) if shortcut is not None else u)
            self.sweep([x], f, 2 if pre is not None else 1, seg_a, [(h1, h1st), (s, None)],
                       self.side(max(cin, cout)) // f * f)
            self.free(x)
            del x
        n2 = self.norm_fn(blk.norm2, h1st, cout)
        ost = self.stats(next_norm) if next_norm is not None else None
        # the output overwrites s in place: s is read only at the tile's core, h1 gives the halo
        self.sweep([h1, s], 1, 1, lambda h, r: blk.conv2(n2(h)).add_(r), [(s, ost)], self.side(cout))
        self.free(h1)
        return s, ost

    def attnblock(self, attn, x, xst, next_norm):
        """Mid-block attention per attention tile: queries of a core of ``attention_tile`` image pixels, keys/values
        of the core plus ``overlap`` image pixels on each side. Any other module at this place is run per tile with
        the same context, as a local op."""
        C, H, W = x.shape[1:]
        ost = self.stats(next_norm)
        out = self.new_map(C, H, W)
        ratio = max(1, self.down)
        side = max(8, (self.attention_tile or 2 * self.tile) // ratio)
        margin = max(0, math.ceil(self.overlap / ratio))
        if _is_attnblock(attn):
            scale = shift = None
            if not self.planning:
                w, b = self.norm_params(attn.norm, torch.empty((), dtype=self.dtype, device=self.device))
                scale, shift = xst.affine(w, b, attn.norm.eps, C)
                scale, shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
            dtype = self.dtype

            def fn(t, core):
                y0, y1, x0, x1 = core
                h = self.scale_shift(t, scale, shift).to(dtype)
                q = attn.q(h[:, :, y0:y1, x0:x1])
                k, v = attn.k(h), attn.v(h)
                del h
                return attn.proj_out(self.attention(q, k, v)).add_(t[:, :, y0:y1, x0:x1])
            self.sweep([x], 1, margin, fn, [(out, ost)], side, core_arg=True)
        else:
            self.sweep([x], 1, margin, lambda t: attn(t), [(out, ost)], side)
        self.free(x)
        return out, ost


def _softmax_attention(q, k, v, chunk: int = 4096):
    """Softmax attention of the VAE's AttnBlock (one head of all channels, scale 1/sqrt(C)); q may cover fewer
    pixels than k and v. Queries in chunks to bound the score matrix."""
    B, C, Hq, Wq = q.shape
    # tokens x channels: a view for channels-last maps, a copy for NCHW ones
    qs = q.permute(0, 2, 3, 1).reshape(B, 1, Hq * Wq, C)
    ks = k.permute(0, 2, 3, 1).reshape(B, 1, -1, C).contiguous()
    vs = v.permute(0, 2, 3, 1).reshape(B, 1, -1, C).contiguous()
    out = torch.empty((B, 1, Hq * Wq, C), dtype=q.dtype, device=q.device)
    for i in range(0, qs.shape[2], chunk):
        out[:, :, i:i + chunk] = F.scaled_dot_product_attention(qs[:, :, i:i + chunk].contiguous(), ks, vs)
    return out.view(B, Hq, Wq, C).permute(0, 3, 1, 2)  # (B, C, Hq, Wq) with channels-last strides


# --------------------------------------------------------------------------------------------------- walks


def _decode_one(r: _Runner, dec, pqc, z):
    """z: (1, Cz, h, w) parked float map. Returns (1, out_ch, 8h, 8w) float32 on r.out_device."""
    h, w = z.shape[-2:]
    nres = dec.num_resolutions
    C = dec.conv_in.out_channels
    x = r.new_map(C, h, w)
    xst = r.stats(dec.mid.block_1.norm1)

    def seg_in(t):
        if pqc is not None:
            t = pqc(t)
        return dec.conv_in(t)
    r.sweep([z], 1, 1, seg_in, [(x, xst)], r.side(C))
    hx = [x]
    del x
    x, xst = r.resblock(dec.mid.block_1, hx, xst, dec.mid.attn_1.norm if _is_attnblock(dec.mid.attn_1) else
                        dec.mid.block_2.norm1)
    x, xst = r.attnblock(dec.mid.attn_1, x, xst, dec.mid.block_2.norm1)
    hx = [x]
    del x
    x, xst = r.resblock(dec.mid.block_2, hx, xst, dec.up[nres - 1].block[0].norm1)
    pre = None
    for i_level in reversed(range(nres)):
        lv = dec.up[i_level]
        for i_block, blk in enumerate(lv.block):
            if i_block + 1 < len(lv.block):
                nxt = lv.block[i_block + 1].norm1
            elif i_level != 0:
                nxt = None  # the upsampler comes next; the statistics needed are those of its output
            else:
                nxt = dec.norm_out
            hx = [x]
            del x
            x, xst = r.resblock(blk, hx, xst, nxt, pre=pre)
            pre = None
        if i_level != 0:
            up = lv.upsample
            H, W = x.shape[-2:]
            c = x.shape[1]
            # Store the upsampled map unless it would be the largest thing kept (the decoder's last upsampler:
            # 256 channels at full resolution); then recompute it inside the next block (costs one more conv).
            # keep_upsampled=True stores it anyway (faster, 512 instead of 320 x H x W values kept).
            if r.keep_upsampled or (r.keep_upsampled is None and c * 4 * H * W <= r.ch0 * r.full_area):
                u = r.new_map(c, 2 * H, 2 * W)
                ust = r.stats(dec.up[i_level - 1].block[0].norm1)
                r.sweep([x], 2, 1, up, [(u, ust)], r.side(c) // 2 * 2)
                r.free(x)
                x, xst = u, ust
            else:
                pre = up
    n = r.norm_fn(dec.norm_out, xst, x.shape[1])
    H, W = x.shape[-2:]
    out = r.new_map(dec.conv_out.out_channels, H, W, dtype=torch.float32, device=r.out_device)

    def seg_out(t):
        y = dec.conv_out(n(t))
        if getattr(dec, "tanh_out", False):
            y = torch.tanh(y)
        return y.float()
    r.sweep([x], 1, 1, seg_out, [(out, None)], r.side(x.shape[1]))
    r.free(x)
    return out


def _encode_one(r: _Runner, enc, qc, zc: int, pixels, process_input):
    """pixels: (1, C, H, W) view (any dtype/device). Returns the posterior mode (1, zc, H/8, W/8) float32."""
    H, W = pixels.shape[-2:]
    nres = enc.num_resolutions
    C = enc.conv_in.out_channels
    x = r.new_map(C, H, W)
    first = enc.down[0].block[0]
    xst = r.stats(first.norm1)
    dtype = r.dtype

    def seg_in(t):
        t = process_input(t) if process_input is not None else t
        return enc.conv_in(t.to(dtype))
    r.sweep([pixels], 1, 1, seg_in, [(x, xst)], r.side(C))
    for i_level in range(nres):
        lv = enc.down[i_level]
        for i_block, blk in enumerate(lv.block):
            if i_block + 1 < len(lv.block):
                nxt = lv.block[i_block + 1].norm1
            elif i_level != nres - 1:
                nxt = enc.down[i_level + 1].block[0].norm1
            else:
                nxt = enc.mid.block_1.norm1
            # the downsampler after the level's last block is not normalised before the next block: the stats of
            # this block's output are not needed then, but the downsampled map's are.
            last_down = i_block + 1 == len(lv.block) and i_level != nres - 1
            hx = [x]
            del x
            x, xst = r.resblock(blk, hx, xst, None if last_down else nxt)
        if i_level != nres - 1:
            c, h, w = x.shape[1:]
            d = r.new_map(c, h // 2, w // 2)
            dst = r.stats(enc.down[i_level + 1].block[0].norm1)
            r.sweep([x], 0.5, 2, lv.downsample, [(d, dst)], max(8, r.side(c) // 2 // 8 * 8))
            r.free(x)
            x, xst = d, dst
            r.down *= 2
    hx = [x]
    del x
    x, xst = r.resblock(enc.mid.block_1, hx, xst, enc.mid.attn_1.norm if _is_attnblock(enc.mid.attn_1) else
                        enc.mid.block_2.norm1)
    x, xst = r.attnblock(enc.mid.attn_1, x, xst, enc.mid.block_2.norm1)
    hx = [x]
    del x
    x, xst = r.resblock(enc.mid.block_2, hx, xst, enc.norm_out)
    n = r.norm_fn(enc.norm_out, xst, x.shape[1])
    h, w = x.shape[-2:]
    out = r.new_map(zc, h, w, dtype=torch.float32, device=r.out_device)

    def seg_out(t):
        y = enc.conv_out(n(t))
        if qc is not None:
            y = qc(y)
        return y[:, :zc].float()
    r.sweep([x], 1, 1, seg_out, [(out, None)], r.side(x.shape[1]))
    r.free(x)
    return out


# --------------------------------------------------------------------------------------------------- public API


def _runner(device, dtype, tile, overlap, ch0, progress, norm_params, attention, planning, out_device, full_area,
            park, attention_tile=None):
    device = torch.device(device)
    if park is None:
        park = "cpu" if device.type != "cpu" else device
    check = dtype == torch.float16
    r = _Runner(device, dtype, park, tile, overlap, ch0, progress, norm_params, attention, planning, check)
    r.out_device = torch.device(out_device) if out_device is not None else torch.device("cpu")
    r.attention_tile = attention_tile
    r.full_area = full_area
    r.down = 1
    return r


def _validate(tile, overlap):
    if not isinstance(tile, int) or tile < 16:
        raise ValueError(f"tile_size must be an integer of at least 16 pixels, got {tile!r}")
    if not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be a non-negative integer (pixels), got {overlap!r}")


def _upcast_dtype(device):
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _cast_copy(mods, dtype):
    return [copy.deepcopy(m).to(dtype) if m is not None else None for m in mods]


def _each_image(what, mods, dtype, device, on_upcast, planning, out_shape, out_device, make_runner, one):
    """``one(r, mods, b)`` for every image ``b`` of the batch, each into its slice of a float32 output of
    ``out_shape`` on ``out_device``, under a runner ``make_runner(dtype)``; the runner itself when ``planning``.
    In fp16 a non-finite activation restarts the whole batch in a wider dtype on a cast copy of ``mods``."""
    while True:
        r = make_runner(dtype)
        try:
            out = torch.empty(out_shape, dtype=torch.float32, device="meta" if planning else out_device)
            with torch.inference_mode():
                for b in range(out_shape[0]):
                    o = one(r, mods, b)
                    if not planning:
                        out[b:b + 1] = o
                    r.free(o)
            return r if planning else out
        except _Overflow:
            if dtype != torch.float16:
                raise FloatingPointError(f"the VAE {what} gives non-finite values in {dtype}") from None
            dtype = _upcast_dtype(device)
            if on_upcast is not None:
                on_upcast(dtype)
            mods = _cast_copy(mods, dtype)


def decode(first_stage_model, latent: torch.Tensor, *, tile: int = 1024, overlap: int = 64, device=None,
           dtype=None, out_device="cpu", park=None, progress: Optional[Callable[[int], None]] = None,
           norm_params=None, attention=None, on_upcast: Optional[Callable[[torch.dtype], None]] = None,
           attention_tile: Optional[int] = None, keep_upsampled: Optional[bool] = None, _planning: bool = False):
    """Decode ``latent`` (B, C, h, w) with ``first_stage_model`` (ComfyUI's AutoencoderKL / AutoencodingEngine).
    Returns the raw decoder output (B, out_ch, 8h, 8w) float32 on ``out_device`` (before ComfyUI's
    ``process_output``). ``tile``/``overlap`` in image pixels (``attention_tile``, default 2 x ``tile``, sets the
    attention tile alone); ``progress(ticks)`` after every tile (raise from it to interrupt). In fp16, a non-finite
    activation (the SD-XL VAE overflows fp16) restarts the decode in bf16 (CUDA) or fp32 on a cast copy of the
    modules, and calls ``on_upcast(new_dtype)``. ``keep_upsampled``: store the decoder's last upsampled map (256
    channels at full resolution) instead of recomputing it per tile: about 12 % faster, 1.6x the kept memory (None:
    store it only when it is not the largest map)."""
    _validate(tile, overlap)
    check_supported(first_stage_model, "decode")
    if latent.ndim != 4:
        raise ValueError(f"expected a latent of shape (batch, channels, height, width), got {tuple(latent.shape)}")
    dec = first_stage_model.decoder
    pqc = getattr(first_stage_model, "post_quant_conv", None)
    zc = pqc.in_channels if pqc is not None else dec.conv_in.in_channels
    if latent.shape[1] != zc:
        raise ValueError(f"the latent has {latent.shape[1]} channels, this VAE expects {zc}")
    if device is None:
        device = dec.conv_in.weight.device
    if dtype is None:
        dtype = dec.conv_in.weight.dtype
    up = 2 ** (dec.num_resolutions - 1)
    B, _, h, w = latent.shape

    def make_runner(dt):
        r = _runner(device, dt, tile, overlap, dec.ch, progress, norm_params, attention, _planning, out_device,
                    h * w * up * up, park, attention_tile)
        r.keep_upsampled = keep_upsampled
        return r

    def one(r, mods, b):
        r.down = up
        z = latent[b:b + 1]
        return _decode_one(r, mods[0], mods[1], z if _planning else z.to(r.park))

    return _each_image("decode", [dec, pqc], dtype, device, on_upcast, _planning,
                       (B, dec.conv_out.out_channels, h * up, w * up), out_device, make_runner, one)


def encode(first_stage_model, pixels: torch.Tensor, *, tile: int = 1024, overlap: int = 64, device=None, dtype=None,
           out_device="cpu", park=None, process_input=None, progress: Optional[Callable[[int], None]] = None,
           norm_params=None, attention=None, on_upcast=None, attention_tile: Optional[int] = None,
           _planning: bool = False):
    """Encode ``pixels`` (B, C, H, W), H and W multiples of the VAE's downscale, into the posterior mode
    (B, z, H/8, W/8) float32 on ``out_device``. ``process_input`` maps pixels to the network's input range per tile
    (ComfyUI: ``2x - 1``). Other arguments as in ``decode``."""
    _validate(tile, overlap)
    check_supported(first_stage_model, "encode")
    if pixels.ndim != 4:
        raise ValueError(f"expected pixels of shape (batch, channels, height, width), got {tuple(pixels.shape)}")
    enc = first_stage_model.encoder
    down = 2 ** (enc.num_resolutions - 1)
    if pixels.shape[1] != enc.conv_in.in_channels:
        raise ValueError(f"the image has {pixels.shape[1]} channels, this VAE expects {enc.conv_in.in_channels}")
    if pixels.shape[2] % down or pixels.shape[3] % down:
        raise ValueError(f"image height and width must be multiples of {down}, got {tuple(pixels.shape[2:])}")
    qc = getattr(first_stage_model, "quant_conv", None)
    zc = (qc.out_channels if qc is not None else enc.conv_out.out_channels) // 2
    if device is None:
        device = enc.conv_in.weight.device
    if dtype is None:
        dtype = enc.conv_in.weight.dtype
    B, _, H, W = pixels.shape

    def make_runner(dt):
        return _runner(device, dt, tile, overlap, enc.ch, progress, norm_params, attention, _planning, out_device,
                       H * W, park, attention_tile)

    def one(r, mods, b):
        r.down = 1
        p = pixels[b:b + 1]
        if _planning:
            p = torch.empty(p.shape, dtype=p.dtype, device="meta")
        return _encode_one(r, mods[0], mods[1], zc, p, process_input)

    return _each_image("encode", [enc, qc], dtype, device, on_upcast, _planning, (B, zc, H // down, W // down),
                       out_device, make_runner, one)


def plan(first_stage_model, shape, *, what: str = "decode", tile: int = 1024, overlap: int = 64, dtype=None,
         attention_tile: Optional[int] = None, keep_upsampled: Optional[bool] = None):
    """Without computing anything: the number of tile steps (for a progress bar) and the peak bytes of parked
    activations for a latent (decode) or image (encode) of ``shape`` (B, C, H, W)."""
    meta = torch.empty(shape, device="meta")
    fn = decode if what == "decode" else encode
    kw = {"keep_upsampled": keep_upsampled} if what == "decode" else {}
    r = fn(first_stage_model, meta, tile=tile, overlap=overlap, device="cpu", dtype=dtype,
           attention_tile=attention_tile, _planning=True, **kw)
    return {"steps": r.ticks, "kept_bytes": r.peak}
