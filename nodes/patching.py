"""Applying a LinFusion checkpoint to a ComfyUI model: clone, then one object patch per self-attention layer."""
from __future__ import annotations

import logging

import comfy.model_management
import comfy.ops
import comfy.utils
import torch

from ..linfusion_core.checkpoint import LinFusionCheckpoint, LinFusionFileError
from ..linfusion_core.chunked import TokenChunkedFeedForward, unwrap
from ..linfusion_core.layer import LinFusionAttention, build_layer
from ..linfusion_core.mapping import check_widths, layer_map
from . import lifecycle, lowmem
from .memory import install_memory_estimate

log = logging.getLogger("LinFusion")

FAMILY_NAMES = {"SD15": "SD-1.5", "SD20": "SD-2.x", "SD21UnclipL": "SD-2.1 unCLIP", "SD21UnclipH": "SD-2.1 unCLIP",
                "SDXL": "SD-XL", "SDXLRefiner": "SD-XL refiner", "SSD1B": "SSD-1B", "Segmind_Vega": "Segmind Vega",
                "KOALA_700M": "KOALA-700M", "KOALA_1B": "KOALA-1B", "SD_X4Upscaler": "SD x4 upscaler"}


def model_family(model) -> str:
    cfg = model.model.model_config
    return FAMILY_NAMES.get(type(cfg).__name__, type(cfg).__name__)


def _weight_dtype(model) -> torch.dtype:
    dtype = model.model.get_dtype()
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # fp8-stored UNets compute in their manual-cast dtype; LinFusion's small layers keep that precision.
        dtype = model.model.manual_cast_dtype or torch.float16
    return dtype


def _operations(model):
    # The same operation classes ComfyUI would pick for this model, so the new layers load, offload and
    # cast like the rest of it (lowvram streaming, manual casting).
    if model.model.manual_cast_dtype is not None:
        return comfy.ops.manual_cast
    return comfy.ops.disable_weight_init


def unet_config(model) -> dict:
    return model.model.model_config.unet_config


def attn1_modules(model) -> dict:
    """{ComfyUI path under diffusion_model: module} for every self-attention layer, object patches considered."""
    d2c = comfy.utils.unet_to_diffusers(unet_config(model))
    paths = sorted({ck[: -len(".to_q.weight")] for dk, ck in d2c.items() if dk.endswith(".attn1.to_q.weight")})
    return {p: model.get_model_object(f"diffusion_model.{p}") for p in paths}


def apply_linfusion(model, ckpt: LinFusionCheckpoint, softmax_below_tokens: int = 0, low_memory: str = "auto"):
    """A clone of ``model`` with every attn1 replaced by LinFusion. Raises LinFusionFileError (model untouched).
    ``low_memory``: "auto", "on" or "off", the low-memory mode (nodes/lowmem.py)."""
    low_memory = lowmem.normalize_mode(low_memory)
    family = model_family(model)
    desc = f"the {family} model"
    d2c = comfy.utils.unet_to_diffusers(unet_config(model))
    mapped = layer_map(ckpt, d2c, desc)
    bases = {}
    for _, path in mapped:
        base = model.get_model_object(f"diffusion_model.{path}")
        if isinstance(base, LinFusionAttention):  # applying LinFusion again replaces the earlier one
            base = base._base
        bases[path] = base
    widths = {p: b.to_q.in_features for p, b in bases.items()}
    heads = {p: b.heads for p, b in bases.items()}
    check_widths(ckpt, mapped, widths, heads, desc)
    for what in lifecycle.bypasses(model.model_options):
        log.warning("LinFusion: the model given to Apply LinFusion already has %s.", what)

    ops, dtype = _operations(model), _weight_dtype(model)
    m = model.clone()
    pbar = comfy.utils.ProgressBar(len(mapped))
    extra_bytes = 0
    for lw, path in mapped:
        comfy.model_management.throw_exception_if_processing_interrupted()
        layer = build_layer(bases[path], lw, ops=ops, dtype=dtype, softmax_below_tokens=softmax_below_tokens,
                            label=path)
        extra_bytes += sum(p.numel() * p.element_size() for p in layer.linfusion.parameters())
        m.add_object_patch(f"diffusion_model.{path}", layer)
        pbar.update(1)
    if hasattr(m, "size") and isinstance(m.size, int) and m.size > 0:
        m.size += extra_bytes
    chunk_feed_forwards(m, [f"diffusion_model.{path}" for _, path in mapped])
    lowmem.install(m, low_memory)
    install_memory_estimate(m, softmax_below_tokens, low_memory=low_memory)
    lifecycle.attach(m)
    log.info("LinFusion: %s -> %d self-attention layers of the %s model (%s)", ckpt.path.name, len(mapped), family,
             "own projections" if mapped[0][0].has_projections else "base projections")
    return m


def chunk_feed_forwards(model, attn1_keys) -> int:
    """Object patches on ``model`` (a ModelPatcher) running the ``ff`` beside each patched attn1 (object-patch
    keys) over token chunks (exact: the FF is per token), so that at high resolution the step's largest
    temporary is no longer the GEGLU of the first level. Returns how many were patched."""
    n = 0
    for attn1_key in attn1_keys:
        key = f"{attn1_key.rsplit('.', 1)[0]}.ff"
        try:
            ff = unwrap(model.get_model_object(key))
        except AttributeError:
            continue
        model.add_object_patch(key, TokenChunkedFeedForward(ff))
        n += 1
    return n
