"""Reading a layer's weights the way ComfyUI's own op would use them, for code that computes with a layer's
parameters itself (the chunked GroupNorm of the low-memory mode, the tiled VAE's global GroupNorm)."""
from __future__ import annotations

import contextlib

import comfy.ops


@contextlib.contextmanager
def weight_and_bias(module, like):
    """``(weight, bias)`` of ``module`` on ``like``'s device and dtype as ComfyUI's op would use them for ``like``:
    cast, streamed (lowvram, DynamicVRAM) or with weight functions (LoRA-style patches) applied where the layer asks
    for it, else the parameters themselves. ComfyUI 0.3.75 and 0.33+ spell this differently; on 0.33+ the tensors
    are valid inside the ``with`` only."""
    if not (getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
            or getattr(module, "bias_function", None)):
        yield module.weight, module.bias
        return
    ctx = getattr(comfy.ops, "CastBiasWeightContext", None)
    if ctx is not None:
        with ctx(module, like, offloadable=True) as (w, b):
            yield w, b
        return
    state = comfy.ops.cast_bias_weight(module, like, offloadable=True)
    try:
        yield state[0], state[1]
    finally:
        if len(state) > 2 and hasattr(comfy.ops, "uncast_bias_weight"):
            comfy.ops.uncast_bias_weight(module, *state)
