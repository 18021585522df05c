"""The one place where a ComfyUI model gets LinFusion: ``patch_self_attention`` clones a ModelPatcher (a UNet's or a
ControlNet's) and gives the clone one object patch per self-attention layer, plus the chunked feed-forwards beside
them. ``apply_linfusion`` (the UNet) and nodes/controlnet.py (a ControlNet's encoder) are thin callers."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.model_management
import comfy.ops
import comfy.utils
import torch

from ..linfusion_core.checkpoint import LinFusionCheckpoint
from ..linfusion_core.chunked import TokenChunkedFeedForward, unwrap
from ..linfusion_core.families import by_config_class
from ..linfusion_core.layer import LinFusionAttention, build_layer
from ..linfusion_core.mapping import check_widths, diffusers_attn1_layers, map_layers
from . import lifecycle, lowmem
from .memory import install_memory_estimate

log = logging.getLogger("LinFusion")


@dataclass
class Patched:
    """What ``patch_self_attention`` made: the patched clone, the layers it patched and those it left alone."""
    patcher: object
    patched: list = field(default_factory=list)   # [(ComfyUI path, diffusers name, LinFusion layer index)]
    skipped: list = field(default_factory=list)   # [(ComfyUI path, reason)]


def operations_and_dtype(weight_dtype: torch.dtype, manual_cast_dtype):
    """The operation classes and dtype ComfyUI picked for a model stored in ``weight_dtype`` (manual casting or
    not), so that LinFusion's layers load, offload and cast like the rest of it (lowvram streaming, fp8 storage)."""
    dtype = weight_dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # fp8-stored models compute in their manual-cast dtype; LinFusion's small layers keep that precision.
        dtype = manual_cast_dtype or torch.float16
    ops = comfy.ops.manual_cast if manual_cast_dtype is not None else comfy.ops.disable_weight_init
    return ops, dtype


def patch_self_attention(patcher, ckpt: LinFusionCheckpoint, unet_config: dict, model_desc: str, *,
                         weight_dtype: torch.dtype, manual_cast_dtype=None, prefix: str = "", only=None,
                         softmax_below_tokens: int = 0, use_file_projections: bool = True,
                         label_prefix: str = "") -> Patched:
    """A clone of ``patcher`` whose self-attention layers run LinFusion with the weights of ``ckpt``.

    ``unet_config``: the UNet configuration the module tree under ``prefix`` was built from (for a ControlNet, the
    UNet its encoder mirrors), which gives the diffusers names the file's layers map to; ``only``: diffusers name
    prefixes to patch (None: the whole UNet, which must match the file layer for layer). Checks every width before
    anything is built, and raises LinFusionFileError naming the file and the layer; ``patcher`` is never changed.
    An earlier LinFusion on ``patcher`` is replaced. Layers whose attn1 is cross-attention (``disable_self_attn``)
    are left alone. The clone's ``size`` counts the new weights; its feed-forwards beside the patched layers run in
    token chunks (exact); ``lifecycle.attach`` gives it the hooks that keep it correct under DynamicVRAM, multi-GPU
    and LoRAs."""
    d2c = comfy.utils.unet_to_diffusers(unet_config)
    found, skipped = map_layers(ckpt, d2c, model_desc, only)
    bases = {}
    for _, path, _ in found:
        base = patcher.get_model_object(prefix + path)
        bases[path] = base._base if isinstance(base, LinFusionAttention) else base  # a second Apply replaces
    check_widths(ckpt, found, {p: b.to_q.in_features for p, b in bases.items()},
                 {p: b.heads for p, b in bases.items()}, model_desc)
    cross = {p for p in bases if getattr(patcher.get_model_object(prefix + p[: -len(".attn1")]), "disable_self_attn",
                                         False)}
    skipped += [(f"{p}", "attn1 is cross-attention in this block (disable_self_attn)") for p in sorted(cross)]
    found = [f for f in found if f[1] not in cross]

    ops, dtype = operations_and_dtype(weight_dtype, manual_cast_dtype)
    m = patcher.clone()
    for key, obj in list(m.object_patches.items()):
        if isinstance(obj, lifecycle.OUR_TYPES):  # an earlier LinFusion is replaced, not stacked
            del m.object_patches[key]
    out = Patched(m, skipped=skipped)
    pbar = comfy.utils.ProgressBar(len(found))
    extra_bytes = 0
    for lw, path, name in found:
        comfy.model_management.throw_exception_if_processing_interrupted()
        layer = build_layer(bases[path], lw, ops=ops, dtype=dtype, softmax_below_tokens=softmax_below_tokens,
                            label=label_prefix + path, use_file_projections=use_file_projections)
        extra_bytes += sum(p.numel() * p.element_size() for p in layer.linfusion.parameters())
        m.add_object_patch(prefix + path, layer)
        out.patched.append((path, name, lw.index))
        pbar.update(1)
    if isinstance(getattr(m, "size", None), int) and m.size > 0:
        m.size += extra_bytes
    chunk_feed_forwards(m, [prefix + path for _, path, _ in found])
    lifecycle.attach(m)
    return out


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


# -- the UNet -----------------------------------------------------------------------------------------------------

def model_family(model) -> str:
    name = type(model.model.model_config).__name__
    family = by_config_class(name)
    return family.name if family else name


def unet_config(model) -> dict:
    return model.model.model_config.unet_config


def attn1_modules(model) -> dict:
    """{ComfyUI path under diffusion_model: module} for every self-attention layer, object patches considered."""
    paths = sorted(diffusers_attn1_layers(comfy.utils.unet_to_diffusers(unet_config(model))).values())
    return {p: model.get_model_object(f"diffusion_model.{p}") for p in paths}


def apply_linfusion(model, ckpt: LinFusionCheckpoint, softmax_below_tokens: int = 0, low_memory: str = "auto"):
    """A clone of ``model`` with every attn1 replaced by LinFusion. Raises LinFusionFileError (model untouched).
    ``low_memory``: "auto", "on" or "off", the low-memory mode (nodes/lowmem.py)."""
    low_memory = lowmem.normalize_mode(low_memory)
    family = model_family(model)
    done = patch_self_attention(model, ckpt, unet_config(model), f"the {family} model",
                                weight_dtype=model.model.get_dtype(),
                                manual_cast_dtype=model.model.manual_cast_dtype, prefix="diffusion_model.",
                                softmax_below_tokens=softmax_below_tokens)
    m = done.patcher
    lowmem.install(m, low_memory)
    install_memory_estimate(m, softmax_below_tokens, low_memory=low_memory)
    for what in lifecycle.bypasses(model.model_options):
        log.warning("LinFusion: the model given to Apply LinFusion already has %s.", what)
    if done.skipped:
        log.warning("LinFusion: %d self-attention layer(s) keep softmax attention: %s", len(done.skipped),
                    "; ".join(f"{p} ({why})" for p, why in done.skipped))
    has_proj = any(lw.has_projections for lw in ckpt.layers)
    log.info("LinFusion: %s -> %d self-attention layers of the %s model (%s)", ckpt.path.name, len(done.patched),
             family, "own projections" if has_proj else "base projections")
    return m
