"""Token-chunked feed-forward: the low-memory trick that keeps a transformer block's FF from being a UNet step's
largest temporary at high resolution.

A transformer block's ``ff`` (GEGLU projection to 2 x 4C channels, gelu, product, projection back) works on each
token alone, so running it over chunks of tokens gives the same output while its temporaries stay O(chunk):
unchunked, at SD-1.5's first level they are 16 x the block's input (20 KB per latent pixel in fp32), more than
anything else in the step once attention is linear.
"""
from __future__ import annotations

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 22  # batch x tokens x channels of one input chunk (16 MB in fp32; FF temporaries 16x that)

def chunk_tokens(batch: int, channels: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk for an input of ``batch`` x tokens x ``channels``."""
    return max(256, int(chunk_elements) // max(1, batch * channels))


def is_chunked(batch: int, tokens: int, channels: int, chunk_elements: int = CHUNK_ELEMENTS) -> bool:
    """Whether TokenChunkedFeedForward splits an input of this shape (more than two chunks' worth of tokens)."""
    return tokens > 2 * chunk_tokens(batch, channels, chunk_elements)


class TokenChunkedFeedForward(nn.Module):
    """Runs ``base`` (a per-token module on ``(batch, tokens, channels)``) over token chunks when the input is
    longer than two chunks, writing into one preallocated output.

    The base module's children are re-registered here under their own names (``net`` for ComfyUI's
    FeedForward), so state-dict and LoRA keys such as ``...ff.net.0.proj.weight`` resolve to the same weights
    through the patched module; the base module itself stays out of the module tree."""

    def __init__(self, base: nn.Module, chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        for name, child in base.named_children():
            self.add_module(name, child)
        self.chunk_elements = int(chunk_elements)
        object.__setattr__(self, "_base", base)

    def chunk_tokens(self, x: torch.Tensor) -> int:
        return chunk_tokens(x.shape[0], x.shape[-1], self.chunk_elements)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.dim() != 3 or not is_chunked(x.shape[0], x.shape[1], x.shape[-1], self.chunk_elements):
            return self._base(x, *args, **kwargs)
        t = self.chunk_tokens(x)
        first = self._base(x[:, :t], *args, **kwargs)
        out = first.new_empty(x.shape[0], x.shape[1], first.shape[-1])
        out[:, :t] = first
        del first
        for s in range(t, x.shape[1], t):
            out[:, s:s + t] = self._base(x[:, s:s + t], *args, **kwargs)
        return out


def unwrap(module: nn.Module) -> nn.Module:
    """The original module behind a TokenChunkedFeedForward (or the module itself)."""
    return module._base if isinstance(module, TokenChunkedFeedForward) else module
