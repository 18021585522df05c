"""Exact spatial parallelism: one UNet step over a ``torch.distributed`` process group, every rank holding a
horizontal band of the latent. The output equals the single-process step (up to float rounding), unlike
patch-parallel schemes that reuse stale activations.

Plain torch and torch.distributed; no ComfyUI import. The UNet's own module tree runs on each rank's band; for the
duration of a ``SpatialParallel`` context its modules are adapted where a band is not enough:

- ``nn.Conv2d`` with a spatial kernel: the band gets ``padding`` rows from each neighbour band (a halo exchange,
  (kernel//2)*dilation rows) and zero rows only at the image's top and bottom edge; the conv's own row padding is
  switched off meanwhile. Strided convs (the downsamplers) stay exact because every band starts on a multiple of
  2**levels (``split_bands``), so each band's first row is even at every level.
- Upsamplers (nearest interpolation to the skip tensor's size) are local as they are: a band's skip tensor is that
  band's rows, and its start is even.
- ``nn.GroupNorm``: per-group count, sum and sum of squares of the band (from a local fp32 var_mean, combined in
  fp64) are all-reduced; each rank normalises its band with the global statistics.
- ``LinFusionAttention``: each rank computes phi(k)^T [v | 1] over its own keys (fp32), the group all-reduces it
  (heads x d x (d+1) numbers a sample, whatever the image size) and each rank applies it to its own queries,
  normalised by the global token count:  out = phi(q)(phi(k)^T v / N) / (phi(q) . mean phi(k) + eps).
- Self-attention that stays softmax (layers under ``softmax_below_tokens``, or stock ``attn1`` layers): k and v
  are all-gathered along the tokens (exact, but O(image area) bytes; a warning says so once per layer).
- Cross-attention, feed-forward, LayerNorm, 1x1 convs and the timestep embedding are per token or per sample:
  local, untouched.

``Traffic`` counts the bytes each rank sends (ring all-reduce/all-gather models, exact for point-to-point).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layer import LinFusionAttention, runs_softmax

log = logging.getLogger("LinFusion")

_CHUNK_ELEMENTS = 1 << 21  # batch x tokens x channels per chunk of the linear-attention passes


# ------------------------------------------------------------------------------------------------ geometry

@dataclass(frozen=True)
class Bands:
    """How a latent of ``height`` x ``width`` is cut into horizontal bands, one a rank: rank r holds rows
    ``starts[r]:starts[r+1]``. Every start is a multiple of ``align`` (2**levels of the UNet), the last band
    takes what is left (so any height works, odd included)."""
    height: int
    width: int
    starts: tuple
    align: int

    @property
    def ranks(self) -> int:
        return len(self.starts) - 1

    @property
    def levels(self) -> int:
        return int(math.log2(self.align))

    def rows(self, rank: int, level: int = 0) -> tuple[int, int]:
        """Rows of ``rank``'s band at a UNet level (each level halves, rounding up as a stride-2 conv does)."""
        s, e = self.starts[rank], self.starts[rank + 1]
        f = 1 << level
        return s // f, -(-e // f)

    def size(self, level: int = 0) -> tuple[int, int]:
        f = 1 << level
        return -(-self.height // f), -(-self.width // f)

    def shard(self, x: torch.Tensor, rank: int, scale: int = 1) -> torch.Tensor:
        """``rank``'s rows of a full tensor (..., H, W) at whichever level its height says (or, with ``scale``,
        of a tensor ``scale`` times the latent's size, e.g. a ControlNet hint in pixels)."""
        h = x.shape[-2]
        if scale != 1:
            s, e = self.starts[rank] * scale, min(self.starts[rank + 1] * scale, h)
            return x[..., s:e, :]
        lvl = self.level_of_height(h)
        s, e = self.rows(rank, lvl)
        return x[..., s:e, :]

    def level_of_height(self, h: int) -> int:
        for lvl in range(self.levels + 1):
            if self.size(lvl)[0] == h:
                return lvl
        raise ValueError(f"a tensor {h} rows high fits no level of a {self.height}-row latent")

    def global_tokens(self, rank: int) -> dict:
        """{local tokens of ``rank`` at a level: global tokens at that level} for every level."""
        out = {}
        for lvl in range(self.levels + 1):
            s, e = self.rows(rank, lvl)
            hh, ww = self.size(lvl)
            local = (e - s) * ww
            if out.get(local, hh * ww) != hh * ww:
                raise ValueError(f"band {rank} of {self}: two levels with {local} local tokens")
            out[local] = hh * ww
        return out


def split_bands(height: int, width: int, ranks: int, align: int) -> Bands:
    """Bands for ``ranks`` ranks: units of ``align`` rows shared out as evenly as possible, the last band cut at
    ``height``. Later ranks get the extra units, so a partial last unit joins a band with more whole units. Every
    band keeps at least one row at the deepest level."""
    if align < 1 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    units = -(-height // align)
    if units < ranks:
        raise ValueError(f"a latent {height} rows high has {units} bands of {align} rows: too few for {ranks} ranks "
                         f"(each needs at least one; use fewer devices or a taller image)")
    base, extra = divmod(units, ranks)
    starts = [0]
    for r in range(ranks):
        starts.append(min(height, starts[-1] + (base + (r >= ranks - extra)) * align))
    return Bands(height, width, tuple(starts), align)


def unet_align(module: nn.Module) -> int:
    """2**(number of stride-2 convs on the main path): the band alignment a UNet needs. Counts the strided
    ``nn.Conv2d`` modules; a ControlNet's hint encoder (in pixels) counts too, which only makes bands coarser."""
    n = sum(1 for m in module.modules() if isinstance(m, nn.Conv2d) and max(_pair(m.stride)) > 1)
    return 1 << n


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ------------------------------------------------------------------------------------------------ traffic

class Traffic:
    """Bytes this rank sends, by kind. Collectives are counted as their ring algorithms send them:
    all-reduce of S bytes 2(n-1)/n*S, all-gather (n-1) x the (padded) shard; point-to-point as sent."""

    def __init__(self):
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def as_dict(self) -> dict:
        return {"total": self.total, "bytes": dict(self.bytes), "calls": dict(self.calls)}


class Comm:
    """The group's collectives, with traffic accounting."""

    def __init__(self, group=None, traffic: Traffic | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.traffic = traffic if traffic is not None else Traffic()

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def halo(self, x: torch.Tensor, rows: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows above this band, rows below it) from the neighbour bands along dim -2; None at the image edge."""
        if x.shape[-2] < rows:
            raise RuntimeError(f"a band of {x.shape[-2]} rows cannot give a halo of {rows}")
        ops, above, below = [], None, None
        if self.rank > 0:
            above = torch.empty_like(x[..., :rows, :], memory_format=torch.contiguous_format)
            ops.append(dist.P2POp(dist.isend, x[..., :rows, :].contiguous(), self._global(self.rank - 1), self.group))
            ops.append(dist.P2POp(dist.irecv, above, self._global(self.rank - 1), self.group))
        if self.rank < self.size - 1:
            below = torch.empty_like(x[..., -rows:, :], memory_format=torch.contiguous_format)
            ops.append(dist.P2POp(dist.isend, x[..., -rows:, :].contiguous(), self._global(self.rank + 1), self.group))
            ops.append(dist.P2POp(dist.irecv, below, self._global(self.rank + 1), self.group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            sent = sum(o.tensor.numel() * o.tensor.element_size() for o in ops if o.op is dist.isend)
            self.traffic.add("halo", sent)
        return above, below

    def all_reduce(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        n = self.size
        self.traffic.add(kind, 2 * (n - 1) / n * t.numel() * t.element_size())
        return t

    def all_gather_rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenation along ``dim`` of every rank's ``t`` (sizes along ``dim`` may differ)."""
        n = torch.tensor([t.shape[dim]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s.item()) for s in sizes]
        m = max(sizes)
        if t.shape[dim] < m:
            pad = list(t.shape)
            pad[dim] = m - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad)], dim=dim)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        self.traffic.add("all_gather", (self.size - 1) * t.numel() * t.element_size())
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)

    def gather_rows(self, t: torch.Tensor, bands: Bands, dst: int = 0) -> torch.Tensor | None:
        """The full tensor (bands stacked along dim -2) on rank ``dst``; None elsewhere."""
        lvl = 0
        sizes = [bands.rows(r, lvl)[1] - bands.rows(r, lvl)[0] for r in range(self.size)]
        m = max(sizes)
        if t.shape[-2] < m:
            t = torch.cat([t, t.new_zeros(*t.shape[:-2], m - t.shape[-2], t.shape[-1])], dim=-2)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.rank == dst else None
        dist.gather(t, parts, dst=self._global(dst), group=self.group)
        if self.rank != dst:
            self.traffic.add("gather", t.numel() * t.element_size())
            return None
        return torch.cat([p[..., :s, :] for p, s in zip(parts, sizes)], dim=-2)


# ------------------------------------------------------------------------------------------------ math

def _phi(u: torch.Tensor) -> torch.Tensor:
    return F.elu(u) + 1.0


def linear_attention_state(k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """phi(k)^T [v | 1] per sample and head over this rank's keys, fp32 (or wider): (B, heads, d, d+1), where the
    last column is sum phi(k). Sums of these over ranks are the global state."""
    B, M, C = k.shape
    d = C // heads
    acc = torch.promote_types(k.dtype, torch.float32)
    state = torch.zeros(B, heads, d, d + 1, dtype=acc, device=k.device)
    T = max(64, _CHUNK_ELEMENTS // max(1, B * C))
    for s in range(0, M, T):
        kf = _phi(k[:, s:s + T].to(acc)).unflatten(-1, (heads, d))  # (B, n, H, d)
        vc = v[:, s:s + T].to(acc).unflatten(-1, (heads, d))
        v1 = torch.cat([vc, torch.ones_like(vc[..., :1])], dim=-1)  # (B, n, H, d+1)
        state += torch.einsum("bnhi,bnhj->bhij", kf, v1)
    return state


def linear_attention_apply(q: torch.Tensor, state: torch.Tensor, n_queries: int, n_keys: int,
                           eps: float = 1e-4) -> torch.Tensor:
    """LinFusion's output for this rank's queries from the global ``state`` (linear_attention_state summed over
    every rank): phi(q)(kv / N) / (phi(q) . ksum / M + eps), N and M the global query and key counts."""
    B, N, C = q.shape
    H, d = state.shape[1], state.shape[2]
    aug = state.clone()
    aug[..., :d] /= n_queries
    aug[..., d] /= n_keys
    out = torch.empty(B, N, C, dtype=q.dtype, device=q.device)
    T = max(64, _CHUNK_ELEMENTS // max(1, B * C))
    for s in range(0, N, T):
        qf = _phi(q[:, s:s + T].to(aug.dtype)).unflatten(-1, (H, d))  # (B, n, H, d)
        r = torch.einsum("bnhi,bhij->bnhj", qf, aug)
        out[:, s:s + T] = (r[..., :d] / (r[..., d:] + eps)).flatten(-2).to(q.dtype)
    return out


def sdpa_attention(q, k, v, heads: int, module=None) -> torch.Tensor:
    """Plain softmax attention on (B, tokens, C) tensors with the heads packed in C."""
    B, N, C = q.shape
    d = C // heads
    qh, kh, vh = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).flatten(-2)


def default_weights(module: nn.Module, x: torch.Tensor):
    """(weight, bias) of a norm module in ``x``'s dtype and device."""
    w = None if module.weight is None else module.weight.to(dtype=x.dtype, device=x.device)
    b = None if module.bias is None else module.bias.to(dtype=x.dtype, device=x.device)
    return w, b


# ------------------------------------------------------------------------------------------------ the context

_WARNED: set = set()


class SpatialParallel:
    """``with SpatialParallel(unet, bands, group):`` runs ``unet`` (any module tree of nn.Conv2d, nn.GroupNorm,
    LinFusionAttention and per-token layers) on this rank's band, exactly as the whole image would run.

    ``weight_fn(module, x) -> (weight, bias)`` gives a norm's affine parameters (the host's casting, e.g. for
    offloaded or manually cast weights); ``softmax_fn(q, k, v, heads, module)`` runs softmax self-attention on
    the gathered keys. The modules are restored on exit."""

    def __init__(self, module: nn.Module, bands: Bands, group=None, traffic: Traffic | None = None,
                 weight_fn=default_weights, softmax_fn=sdpa_attention):
        self.module = module
        self.bands = bands
        self.comm = Comm(group, traffic)
        if self.comm.size != bands.ranks:
            raise ValueError(f"{bands.ranks} bands for a group of {self.comm.size} ranks")
        self.rank = self.comm.rank
        self.weight_fn = weight_fn
        self.softmax_fn = softmax_fn
        self._tokens = bands.global_tokens(self.rank)
        self._undo = []

    @property
    def traffic(self) -> Traffic:
        return self.comm.traffic

    def global_tokens(self, local: int) -> int:
        try:
            return self._tokens[local]
        except KeyError:
            raise RuntimeError(f"rank {self.rank}: an attention input of {local} tokens fits no level of "
                               f"{self.bands}") from None

    # -------------------------------------------------------------------------------- install / restore
    def __enter__(self):
        try:
            for name, m in self.module.named_modules():
                if isinstance(m, nn.Conv2d):
                    self._install_conv(name, m)
                elif isinstance(m, nn.GroupNorm):
                    self._override(m, self._groupnorm)
                elif isinstance(m, LinFusionAttention):
                    self._override(m, self._linfusion)
                elif name.endswith("attn1") and all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")):
                    self._override(m, lambda mod, *a, _n=name, **k: self._softmax_self_attention(mod, *a, label=_n, **k))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        return False

    def _override(self, m: nn.Module, fn):
        def forward(*args, **kwargs):
            return fn(m, *args, **kwargs)
        had = "forward" in m.__dict__
        old = m.__dict__.get("forward")
        m.forward = forward

        def undo():
            if had:
                m.forward = old
            else:
                del m.forward
        self._undo.append(undo)

    def _install_conv(self, name: str, m: nn.Conv2d):
        kh = _pair(m.kernel_size)[0]
        if isinstance(m.padding, str):
            raise ValueError(f"conv {name}: padding={m.padding!r} cannot be split into bands")
        ph, pw = _pair(m.padding)
        dh = _pair(m.dilation)[0]
        if kh == 1 and ph == 0:
            return  # per pixel
        if m.padding_mode != "zeros" or (kh - 1) * dh != 2 * ph:
            raise ValueError(f"conv {name}: only zero-padded 'same' convs can be split into bands "
                             f"(kernel {kh}, dilation {dh}, padding {ph}, mode {m.padding_mode})")
        stride = _pair(m.stride)[0]
        comm = self.comm

        def pre_hook(mod, args):
            x = args[0]
            if stride > 1 and comm.rank < comm.size - 1 and x.shape[-2] % stride:
                raise RuntimeError(f"conv {name}: band of {x.shape[-2]} rows is not aligned to the stride {stride}")
            above, below = comm.halo(x, ph)
            zeros = None
            if above is None or below is None:
                zeros = x.new_zeros(*x.shape[:-2], ph, x.shape[-1])
            x = torch.cat([zeros if above is None else above, x, zeros if below is None else below], dim=-2)
            return (x,) + tuple(args[1:])

        handle = m.register_forward_pre_hook(pre_hook)
        old = m.padding
        m.padding = (0, pw)

        def undo():
            handle.remove()
            m.padding = old
        self._undo.append(undo)

    # -------------------------------------------------------------------------------- the adapted forwards
    def _groupnorm(self, m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        G = m.num_groups
        acc = torch.promote_types(x.dtype, torch.float32)
        xg = x.reshape(B, G, -1).to(acc)
        n = xg.shape[-1]
        var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
        mean64, var64 = mean.double(), var.double()
        stats = torch.stack([torch.full_like(mean64, n), mean64 * n, (var64 + mean64 * mean64) * n])
        self.comm.all_reduce(stats, "groupnorm")
        cnt, s1, s2 = stats
        mu = s1 / cnt
        var_g = (s2 / cnt - mu * mu).clamp_min(0)
        rstd = torch.rsqrt(var_g + m.eps)
        y = ((xg - mu.to(acc)[..., None]) * rstd.to(acc)[..., None]).reshape(x.shape)
        w, b = self.weight_fn(m, x) if m.affine else (None, None)
        shape = (1, C) + (1,) * (x.dim() - 2)
        if w is not None:
            y = y * w.to(acc).reshape(shape)
        if b is not None:
            y = y + b.to(acc).reshape(shape)
        return y.to(x.dtype)

    def _linfusion(self, m: LinFusionAttention, x, context=None, value=None, mask=None, transformer_options={},
                   **kwargs):
        n_global = self.global_tokens(x.shape[1])
        if runs_softmax(n_global, m.softmax_below_tokens):
            return self._softmax_self_attention(m._base, x, context, value, mask, transformer_options,
                                                label=m.label or "(LinFusion layer under softmax_below_tokens)")
        if mask is not None:
            raise NotImplementedError("LinFusion spatial parallel: masks on self-attention are not supported")
        ctx = x if context is None else context
        val = ctx if value is None else value
        if ctx.shape[:2] != x.shape[:2] or val.shape[:2] != x.shape[:2]:
            raise NotImplementedError("LinFusion spatial parallel: self-attention keys must be the band's own "
                                      f"tokens (got context {tuple(ctx.shape)} for queries {tuple(x.shape)})")
        lf = m.linfusion
        to_q, to_k, to_v, to_out = (lf.to_q, lf.to_k, lf.to_v, lf.to_out) if lf.own_projections else \
            (m.to_q, m.to_k, m.to_v, m.to_out)
        q = to_q(x + lf.to_q_(x))
        k = to_k(ctx + lf.to_k_(ctx))
        v = to_v(val)
        state = linear_attention_state(k, v, m.heads)
        del k, v
        self.comm.all_reduce(state, "linfusion_state")
        return to_out(linear_attention_apply(q, state, n_global, n_global))

    def _softmax_self_attention(self, m, x, context=None, value=None, mask=None, transformer_options={},
                                label=None, **kwargs):
        ctx = x if context is None else context
        val = ctx if value is None else value
        if ctx.shape[1] != x.shape[1]:  # keys that are not this band's tokens: nothing spatial to gather
            return type(m).forward(m, x, context=context, value=value, mask=mask,
                                   transformer_options=transformer_options)
        if mask is not None:
            raise NotImplementedError("LinFusion spatial parallel: masks on self-attention are not supported")
        key = label or id(m)
        if key not in _WARNED:  # once per layer in a process, not every step
            _WARNED.add(key)
            if self.rank == 0:
                log.warning("LinFusion spatial parallel: softmax self-attention %s runs on all-gathered keys and "
                            "values (exact, but its traffic grows with the image area; LinFusion layers "
                            "exchange a fixed-size state)", label or "")
        q = m.to_q(x)
        k = self.comm.all_gather_rows(m.to_k(ctx), dim=1)
        v = self.comm.all_gather_rows(m.to_v(val), dim=1)
        return m.to_out(self.softmax_fn(q, k, v, m.heads, m))


# ------------------------------------------------------------------------------------------------ one step

def shard_control(control, bands: Bands, rank: int):
    """A ComfyUI-style control dict ({name: [tensor or None, ...]}) with every tensor cut to ``rank``'s band."""
    if control is None:
        return None
    return {k: [None if t is None else bands.shard(t, rank) for t in v] for k, v in control.items()}


def unet_step(unet: nn.Module, x: torch.Tensor, timesteps, context=None, *, bands: Bands, group=None,
              y=None, control=None, control_is_sharded: bool = False, transformer_options=None, gather: bool = True,
              traffic: Traffic | None = None, weight_fn=default_weights, softmax_fn=sdpa_attention, forward=None,
              **kwargs):
    """One UNet step (``unet(x, timesteps, context, y, control, transformer_options, **kwargs)``, the
    openaimodel.UNetModel call) on this rank's band.

    ``x``: the full latent (every rank has it, e.g. after a broadcast) or already this rank's band (kept sharded
    from the previous step). Returns the full output on rank 0 and None elsewhere when ``gather``, else this rank's
    band of the output. ``control`` (a ControlNet's residuals, ComfyUI's dict of lists) is cut to the band unless
    ``control_is_sharded`` (a ControlNet run on the band itself, under its own SpatialParallel). ``forward``: what
    to call instead of ``unet`` with the same arguments (a host's wrapper chain that ends in the UNet's own forward;
    the modules it runs are ``unet``'s)."""
    rank = dist.get_rank(group)
    xb = bands.shard(x, rank) if x.shape[-2] == bands.height and bands.ranks > 1 else x
    if xb.shape[-2] != bands.rows(rank)[1] - bands.rows(rank)[0]:
        raise ValueError(f"rank {rank}: latent of {x.shape[-2]} rows fits neither the image nor its band")
    to = {} if transformer_options is None else transformer_options
    with SpatialParallel(unet, bands, group, traffic, weight_fn, softmax_fn) as sp:
        control = control if control_is_sharded else shard_control(control, bands, rank)
        out = (forward or unet)(xb, timesteps, context, y, control, to, **kwargs)
        if gather:
            out = sp.comm.gather_rows(out, bands)
    return out


def traffic_per_step(bands: Bands, batch: int, convs, attention_states, bytes_per_element: int = 2,
                     rank: int = 1) -> int:
    """Bytes ``rank`` sends in one step, from the geometry alone: ``convs`` is [(level, in_channels, halo rows)]
    for every spatial conv, ``attention_states`` [(heads, head size)] for every LinFusion layer (fp32 state).
    Halo: each neighbour gets halo x width x channels x batch elements per conv; states: ring all-reduce. GroupNorm
    statistics (3 x 32 fp64 a sample and norm) are left out: a few kB."""
    n = bands.ranks
    neighbours = (rank > 0) + (rank < n - 1)
    halo = sum(neighbours * p * bands.size(lvl)[1] * c * batch * bytes_per_element for lvl, c, p in convs)
    state = sum(2 * (n - 1) / n * batch * h * d * (d + 1) * 4 for h, d in attention_states)
    return int(halo + state)


# ------------------------------------------------------------------------------------------------ kept workers

def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _pack_root() -> str:
    return __name__.rsplit(".", 2)[0] if __name__.count(".") >= 2 else ""


def send_module(module: nn.Module, group=None, tensors: dict | None = None, drop_attrs=(), scrub=None) -> None:
    """Rank 0's half of a ``load``: the name this pack is imported under (the host's; workers alias it), the module
    tree without its weights (meta tensors, pickled), then every tensor of its state dict broadcast one at a time,
    so no rank holds more than one extra copy of a weight (a pickled UNet in one piece would be a second and
    third copy on every rank). Hooks of other code are closures of this process: they stay behind.

    ``tensors``: {state-dict name: tensor} sent instead of the module's own (weights with a host's patches applied);
    ``drop_attrs``: module attributes the workers get empty (lists of this process's patch functions), never
    copied; ``scrub(skeleton)``: last changes to the copy before it is pickled."""
    import copy
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list([{"op": "load", "pack": _pack_root()}], src=src, group=group)
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    for m in module.modules():
        for attr in drop_attrs:
            v = m.__dict__.get(attr)
            if isinstance(v, (list, tuple, dict)):
                memo[id(v)] = type(v)()
    skeleton = copy.deepcopy(module, memo)
    if scrub is not None:
        scrub(skeleton)
    for m in skeleton.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_hooks",
                      "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_state_dict_pre_hooks"):
            if isinstance(getattr(m, hooks, None), dict):
                getattr(m, hooks).clear()
    sd = module.state_dict()
    sd.update(tensors or {})
    names = [(n, tuple(t.shape), t.dtype) for n, t in sd.items()]
    dist.broadcast_object_list([(skeleton, names)], src=src, group=group)
    del skeleton
    for n, _, _ in names:
        dist.broadcast(sd[n].contiguous(), src=src, group=group)
    dist.barrier(group=group)


def _alias_pack(name: str) -> None:
    """Make this pack importable under ``name`` too (the name rank 0's host imported it under), so that the
    unpickled modules are instances of this process's classes (LinFusionAttention above all)."""
    import importlib
    import sys
    own = _pack_root()
    if not own or name == own or not name:
        return
    for sub in ("layer", "chunked", "masks", "attention"):
        try:
            importlib.import_module(f"{own}.linfusion_core.{sub}")
        except ImportError:
            pass
    for k, m in list(sys.modules.items()):
        if k == own or k.startswith(own + "."):
            sys.modules.setdefault(name + k[len(own):], m)


def _receive_module(cmd: dict, device: str, group=None) -> nn.Module:
    src = 0 if group is None else dist.get_global_rank(group, 0)
    _alias_pack(cmd.get("pack", ""))
    box = [None]
    dist.broadcast_object_list(box, src=src, group=group)
    skeleton, names = box[0]
    sd = {}
    for n, shape, dtype in names:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=src, group=group)
        sd[n] = t
    skeleton.load_state_dict(sd, strict=True, assign=True)
    dist.barrier(group=group)
    return skeleton.eval()


def serve(device: str, group=None, parent_pid: int | None = None) -> None:
    """The loop of a worker rank (rank > 0) kept by a rank-0 host (the ComfyUI node): it waits for commands that
    rank 0 broadcasts, ``{"op": "load"}`` (followed by the module tree and its weights, ``send_module``, once per
    weight change),
    ``{"op": "step", ...}`` (one ``unet_step``, the result gathered on rank 0) and ``{"op": "exit"}``.

    Any failure (rank 0 gone, a collective timing out) ends the worker; so does the death of ``parent_pid``."""
    import os
    import threading
    import time

    if parent_pid is not None:
        def watch():
            while True:
                if os.getppid() != parent_pid:
                    os._exit(3)
                time.sleep(0.5)
        threading.Thread(target=watch, daemon=True).start()
    unet = None
    src = 0 if group is None else dist.get_global_rank(group, 0)
    with torch.no_grad():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=src, group=group)
            cmd = box[0]
            if cmd["op"] == "exit":
                return
            if cmd["op"] == "load":
                unet = None
                unet = _receive_module(cmd, device, group)
                del cmd
            elif cmd["op"] == "step":
                a = _to(cmd["args"], device)
                unet_step(unet, a["x"], a["timesteps"], a["context"], bands=cmd["bands"], group=group, y=a["y"],
                          control=a["control"], transformer_options={}, gather=True, **a["kwargs"])


def worker_main(rank: str, world: str, port: str, device: str, backend: str, parent_pid: str) -> None:
    """Entry point of a worker process started by a rank-0 host: join the group on loopback, then ``serve``.
    Command-line strings in, as the host's launcher passes them."""
    run_worker(device, backend, dict(init_method=f"tcp://127.0.0.1:{port}", rank=int(rank), world_size=int(world)),
               threads_share=int(world), parent_pid=int(parent_pid))


def run_worker(device: str, backend: str, init: dict, threads_share: int = 1, parent_pid: int | None = None) -> None:
    """Join the process group (``init``: init_process_group's arguments; {} for torchrun's environment), ``serve``
    until rank 0 says exit, and end the process: code 0 then, 1 on any failure."""
    import os
    from datetime import timedelta
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // threads_share))
    elif device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    timeout = timedelta(seconds=float(os.environ.get("LINFUSION_PARALLEL_TIMEOUT", "300")))
    code = 1
    try:
        dist.init_process_group(backend, timeout=timeout, **(init or {"init_method": "env://"}))
        serve(device, parent_pid=parent_pid)
        code = 0
    except BaseException:  # noqa: BLE001  (rank 0 gone or a step failed)
        import traceback
        traceback.print_exc()
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        os._exit(code)
