"""A memory estimate for LinFusion-patched models that matches what they use, measured.

ComfyUI sizes its decisions from ``BaseModel.memory_required(input_shape, cond_shapes={})``: 0.15 MB per latent
pixel (x batch) x ``memory_usage_factor`` (SD-1.5: 1.0) without xformers/flash attention. Stock SD attention
actually grows faster than that (quadratically in tokens at the first level). With LinFusion every layer is
linear in the token count, so the true peak of one UNet step is a straight line in latent area, far below the
stock figure at high resolution; two lines, in fact: once the first transformer level's feed-forward runs in
token chunks (linfusion_core/chunked.py, above about 26k first-level tokens at batch 1) the slope falls to less
than half.

Measured (see README, "Memory of a patched model"; ``benchmarks/bench_step_memory.py``): peak resident-memory
growth of one UNet step (CPU, fp32, batch 1 and 2), via VmHWM reset through /proc/self/clear_refs: the SD-1.5
UNet at 512x256 ... 4096x2048 px, the SD-XL UNet at 1024x512 ... 2048x2048 px. The straight line (linfusion_core/families.py, ``Family.memory``) through the
points of the regime an input falls in, scaled by the inference dtype size (fp16/bf16 activations take half of
fp32) and by ``MARGIN``, is what ``install_memory_estimate`` reports.

Scope: the estimate is an object patch on ``memory_required`` of the patched clone, which the per-step batching
check in ``samplers._calc_cond_batch`` (whether cond and uncond fit in one batch, how many area conds run
together) sees. ComfyUI's pre-load estimate (``sampler_helpers.estimate_memory``) runs before object patches are
applied, so a PREPARE_SAMPLING wrapper (``preload_with_estimate``) loads the model with the measured estimate
first; ComfyUI's own load then finds the object patch live.
"""
from __future__ import annotations

import math

from ..linfusion_core.chunked import is_chunked
from ..linfusion_core.families import BY_KEY, Family, by_config_class
from ..linfusion_core.layer import runs_softmax

MARGIN = 1.25  # allocator slack and variation between back-ends


def linear_estimate(input_shape, dtype_size: int = 4, family: Family = BY_KEY["sd15"], margin: float = MARGIN,
                    low_memory: bool = False) -> float:
    """``(per_pixel x latent px x batch x dtype_size/4 + fixed) x margin``, with the family's measured coefficients
    (linfusion_core/families.py) of the regime the input falls in: once the first transformer level's feed-forward
    runs in token chunks (linfusion_core/chunked.py), the "chunked" line where one was measured. ``low_memory``: the
    step in the low-memory mode (nodes/lowmem.py), the family's "lowmem" line where one was measured (never above
    the ordinary one)."""
    batch, pixels = input_shape[0], math.prod(input_shape[2:])
    coeff = family.memory
    if low_memory and "lowmem" in coeff:
        low = coeff["lowmem"]
        return min(linear_estimate(input_shape, dtype_size, family, margin),
                   (low["per_pixel"] * batch * pixels * dtype_size / 4.0 + low["fixed"]) * margin)
    if "chunked" in coeff:
        channels, area_divisor = family.first_transformer_level
        if is_chunked(batch, pixels // area_divisor, channels):
            coeff = coeff["chunked"]
    return (coeff["per_pixel"] * batch * pixels * dtype_size / 4.0 + coeff["fixed"]) * margin


def _dtype_size(base_model) -> int:
    try:
        import comfy.model_management as mm
        dtype = base_model.get_dtype()
        if getattr(base_model, "manual_cast_dtype", None) is not None:
            dtype = base_model.manual_cast_dtype
        return mm.dtype_size(dtype)
    except Exception:
        return 4


def memory_estimate_function(model_patcher, softmax_below_tokens: int = 0, family: Family | None = None,
                             low_memory="off"):
    """``memory_required(input_shape, cond_shapes={})`` for a LinFusion-patched ``model_patcher``, or None for
    families without a measurement (they keep ComfyUI's own estimate). ``low_memory`` ("off", "on", "auto"): the
    low-memory mode of nodes/lowmem.py, whose ``mode_aware_estimate`` then picks the line per call."""
    base = model_patcher.model
    family = family or by_config_class(type(base.model_config).__name__)
    if family is None or family.memory is None:
        return None
    stock = type(base).memory_required.__get__(base)  # the class's own method, whatever is patched in now
    threshold = int(softmax_below_tokens or 0)

    levels = family.attention_levels

    def memory_required(input_shape, cond_shapes={}, low=False):
        soft = softmax_tokens(input_shape, threshold, levels)
        if soft and soft[0] == math.prod(input_shape[2:]) // levels[0]:
            return stock(input_shape, cond_shapes=cond_shapes)  # the largest level too: a stock UNet
        est = linear_estimate(input_shape, _dtype_size(base), family, low_memory=low)
        if soft:
            # The largest level left on softmax, at ComfyUI's stock rate for a UNet whose first attention level
            # has that many tokens (one layer's attention temporaries live at a time).
            est += stock(list(input_shape[:2]) + [soft[0] * levels[0], 1], cond_shapes=cond_shapes)
        return est

    if low_memory not in (None, False, "off"):
        from .lowmem import mode_aware_estimate
        return mode_aware_estimate(memory_required, low_memory, model_patcher)
    return memory_required


def softmax_tokens(input_shape, softmax_below_tokens: int, levels=BY_KEY["sd15"].attention_levels) -> list:
    """Token counts of the attention levels that keep softmax for a latent of ``input_shape``, largest first."""
    pixels = math.prod(input_shape[2:])
    return [pixels // d for d in levels if runs_softmax(pixels // d, softmax_below_tokens)]


def preload_with_estimate(executor, model, noise_shape, conds, *args, **kwargs):
    """Part of the patched clone's PREPARE_SAMPLING wrapper (nodes/lifecycle.py). ComfyUI's ``_prepare_sampling`` reads ``model.model.memory_required`` before it
    loads the model, i.e. before object patches are applied; on a first load it would size the load from the
    stock formula (at 8K on SD-1.5 that is 82 GB, so classic loading streams every weight). Load the patched
    model first through ``load_models_gpu`` with the measured estimate, so the weights stay resident whenever
    estimate + weights fit; then ComfyUI's own preparation runs with the object patch live (it sees the same
    estimate plus the inference memory of ControlNets and other additional models)."""
    est = installed_estimate(model)
    if est is not None:
        import comfy.model_management as mm
        shape = list(noise_shape)
        mm.load_models_gpu([model], memory_required=est([shape[0] * 2] + shape[1:]),
                           minimum_memory_required=est(shape))
    return executor(model, noise_shape, conds, *args, **kwargs)


def install_memory_estimate(model_patcher, softmax_below_tokens: int = 0, family: Family | None = None,
                            low_memory="off"):
    """Make ``model_patcher`` (a patched clone) report LinFusion's measured linear memory: an object patch
    "memory_required" with the signature ``(input_shape, cond_shapes={})``; the clone's PREPARE_SAMPLING wrapper
    (``preload_with_estimate``) makes the pre-load estimate that one too. Families without a measurement keep
    ComfyUI's own estimate. Levels that keep softmax (``runs_softmax`` with ``softmax_below_tokens``) add the
    stock figure for the largest of them; when the first level does, the whole estimate is the stock one.
    ``low_memory``: the mode installed by nodes/lowmem.py ("off", "on", "auto")."""
    fn = memory_estimate_function(model_patcher, softmax_below_tokens, family, low_memory)
    if fn is not None:
        model_patcher.add_object_patch("memory_required", fn)
    return model_patcher


def installed_estimate(model_patcher):
    """The memory_required function install_memory_estimate put on this patcher (None if none)."""
    return model_patcher.object_patches.get("memory_required")
