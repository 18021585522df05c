"""The replacement for one self-attention layer (``attn1``) of a UNet transformer block.

It keeps the base layer's ``to_q/to_k/to_v/to_out`` under their own names (so LoRA keys, state-dict keys and
other packs' attn1 replace patches keep their meaning) and holds LinFusion's weights in ``self.linfusion``:
the residual MLPs ``to_q_``/``to_k_`` and, when the file has them, LinFusion's own projections."""
from __future__ import annotations

import torch
from torch import nn

from . import lowmem
from .attention import linear_attention
from .attention import torch_fast
from .masks import key_padding_keep, masked_linear_attention, warn_fallback_once


def _mlp(dim, mid, ops, dtype, device) -> nn.Sequential:
    # Indices 0, 1, 3 match the released tensor names (to_q_.0 / .1 / .3).
    return nn.Sequential(ops.Linear(dim, mid, dtype=dtype, device=device),
                         ops.LayerNorm(mid, dtype=dtype, device=device),
                         nn.LeakyReLU(0.01),
                         ops.Linear(mid, dim, dtype=dtype, device=device))


TOKENS = ("A layer's tokens are the latent width x height at its level, per image: (width/8)*(height/8) at the "
          "first level of SD-1.5/2.x (SD-XL's attention starts one level down), a quarter of that per level down.")


def runs_softmax(tokens: int, softmax_below_tokens: int) -> bool:
    """The one meaning of ``softmax_below_tokens``, used by the layer, the memory estimate and the node's tooltip:
    a layer whose input holds fewer ``tokens`` than this keeps the base model's softmax attention (0 = never).
    See ``TOKENS``."""
    return softmax_below_tokens > 0 and tokens < softmax_below_tokens


class LinFusionWeights(nn.Module):
    def __init__(self, dim: int, mid_dim: int, own_projections: bool, ops=nn, dtype=None, device=None):
        super().__init__()
        self.to_q_ = _mlp(dim, mid_dim, ops, dtype, device)
        self.to_k_ = _mlp(dim, mid_dim, ops, dtype, device)
        self.own_projections = own_projections
        if own_projections:
            self.to_q = ops.Linear(dim, dim, bias=False, dtype=dtype, device=device)
            self.to_k = ops.Linear(dim, dim, bias=False, dtype=dtype, device=device)
            self.to_v = ops.Linear(dim, dim, bias=False, dtype=dtype, device=device)
            self.to_out = nn.Sequential(ops.Linear(dim, dim, dtype=dtype, device=device), nn.Dropout(0.0))


class LinFusionAttention(nn.Module):
    """LinFusion's normalized linear attention in place of ``base`` (a ComfyUI CrossAttention).

    Below ``softmax_below_tokens`` query tokens (0 = never) the base layer's own softmax attention runs instead.

    In the low-memory mode (lowmem.enabled(), set per UNet call), an input of more than
    ``chunk_elements`` elements runs in token chunks (``_token_chunked``): the projections and LinFusion's MLPs
    never run at full size, and the layer holds its input, its output and one chunk's temporaries instead of
    q, k, v, two MLP hidden states and the attention output at full size (about 5x the input).
    """

    chunk_elements = 1 << 24  # batch x tokens x channels of one token chunk in the low-memory mode

    def __init__(self, base: nn.Module, weights: LinFusionWeights, softmax_below_tokens: int = 0, label: str = ""):
        super().__init__()
        self.heads = base.heads
        self.dim_head = base.dim_head
        self.attn_precision = getattr(base, "attn_precision", None)
        self.to_q, self.to_k, self.to_v, self.to_out = base.to_q, base.to_k, base.to_v, base.to_out
        self.linfusion = weights
        self.softmax_below_tokens = int(softmax_below_tokens)
        self.label = label
        # The base module itself stays out of the module tree (its parameters are the shared to_q.. above),
        # so the model's memory accounting and device moves see every weight exactly once.
        object.__setattr__(self, "_base", base)

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}, **kwargs):
        if runs_softmax(x.shape[1], self.softmax_below_tokens):
            return self._base(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
        lf = self.linfusion
        ctx = x if context is None else context
        val = ctx if value is None else value
        if ctx.shape[0] != x.shape[0]:
            # attn1_patch hooks such as HyperTile retile the queries into a larger batch and pass the untiled
            # context; ComfyUI's attention functions view k/v with the query batch size, so do the same.
            ctx = ctx.reshape(x.shape[0], -1, ctx.shape[-1])
            val = val.reshape(x.shape[0], -1, val.shape[-1])
        keep = None
        if mask is not None:  # key-padding masks run linear (masks.py); any other mask runs the base softmax
            keep, reason = key_padding_keep(mask, x.shape[0], self.heads, x.shape[1], ctx.shape[1])
            if keep is None:
                warn_fallback_once(self, reason)
                return self._base(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
        to_q, to_k, to_v, to_out = self.projections()
        if keep is None and x.numel() > self.chunk_elements and lowmem.is_enabled():
            return self._token_chunked(x, ctx, val)
        q = to_q(x + lf.to_q_(x))
        k = to_k(ctx + lf.to_k_(ctx))
        v = to_v(val)
        if keep is None:
            out = linear_attention(q, k, v, self.heads)
        else:
            out = masked_linear_attention(q, k, v, self.heads, keep)
        return to_out(out)

    def projections(self):
        """(to_q, to_k, to_v, to_out): LinFusion's own where its checkpoint has them, else the base layer's."""
        lf = self.linfusion
        return (lf.to_q, lf.to_k, lf.to_v, lf.to_out) if lf.own_projections else \
            (self.to_q, self.to_k, self.to_v, self.to_out)

    def chunk_plan(self, B: int, N: int, M: int, C: int) -> tuple:
        """(T, L): the attention's own chunk of tokens and the low-memory mode's token chunk, a whole multiple of
        T of about ``chunk_elements`` elements, for (B, N, C) queries against M keys."""
        T = torch_fast.chunk_tokens_for(B, C, N, M)
        return T, max(T, self.chunk_elements // max(1, B * C) // T * T)

    def key_state(self, chunks, N: int, M: int, T: int) -> torch.Tensor:
        """Pass 1 of the token-chunked layer: the attention state from ``chunks``, an iterable of (keys' input,
        values' input) pieces of (B, tokens, C), contiguous, all but the last a whole multiple of T tokens, in
        order (their sums then run as at full size)."""
        lf = self.linfusion
        _, to_k, to_v, _ = self.projections()
        sums = None
        for c, v in chunks:
            sums = torch_fast.key_sums(to_k(c + lf.to_k_(c)), to_v(v), self.heads, T, sums)
        return torch_fast.augmented_state(sums, N, M)

    def query_chunk(self, xc: torch.Tensor, state: torch.Tensor, T: int) -> torch.Tensor:
        """Pass 2 for one contiguous chunk of queries: the layer's output for those tokens."""
        to_q, _, _, to_out = self.projections()
        return to_out(torch_fast.query_pass(to_q(xc + self.linfusion.to_q_(xc)), state, 1e-4, T))

    def _token_chunked(self, x, ctx, val):
        """The same layer over token chunks: pass 1 sums phi(k)^T v and phi(k) over chunks of the keys, pass 2
        runs each chunk of queries through the sums and ``to_out`` into the output. The attention is the torch
        path's own two passes (attention/torch_fast.py) on chunks that are whole multiples of its chunk, so its
        sums run in the same order as at full size; on CUDA it replaces the Triton kernel (the same math, fp32
        sums)."""
        B, N, C = x.shape
        M = ctx.shape[1]
        T, L = self.chunk_plan(B, N, M, C)
        # chunks contiguous as the full-size rows are: the same GEMM per row, bit for bit
        state = self.key_state(((ctx[:, s:s + L].contiguous(), val[:, s:s + L].contiguous())
                                for s in range(0, M, L)), N, M, T)
        out = None
        for s in range(0, N, L):
            o = self.query_chunk(x[:, s:s + L].contiguous(), state, T)
            if out is None:
                out = o.new_empty(B, N, o.shape[-1])
            out[:, s:s + L] = o
        return out

    def extra_repr(self) -> str:
        return f"{self.label} heads={self.heads}, softmax_below_tokens={self.softmax_below_tokens}"


def build_layer(base: nn.Module, lw, ops=nn, dtype=None, softmax_below_tokens: int = 0, label: str = "",
                use_file_projections: bool = True):
    """A LinFusionAttention for ``base`` loaded with one checkpoint layer (``lw``: checkpoint.LayerWeights).
    ``use_file_projections=False`` keeps ``base``'s own to_q/to_k/to_v/to_out even when the file has some (a
    ControlNet's, fine-tuned with it) and takes only LinFusion's MLPs from the file."""
    own = lw.has_projections and use_file_projections
    weights = LinFusionWeights(lw.dim, lw.mid_dim, own, ops=ops, dtype=dtype, device="cpu")
    sd = {k: v.to(dtype) if dtype is not None else v for k, v in lw.tensors.items()
          if own or k.startswith(("to_q_.", "to_k_."))}
    missing, unexpected = weights.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return LinFusionAttention(base, weights, softmax_below_tokens, label)
