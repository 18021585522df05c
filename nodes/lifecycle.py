"""What a patched ModelPatcher (UNet or ControlNet) needs beyond its object patches, so that ComfyUI's newer loaders
handle it like any other clone.

DynamicVRAM (``ModelPatcherDynamic``, ComfyUI 0.33+ on CUDA, on by default) force-casts small layers, LinFusion's
LayerNorms among them, and keeps the originals in a ``backup`` dict that every clone of one checkpoint shares,
keyed by parameter path. Our parameters' paths run through our object patches (``...attn1.linfusion.*``). When a
plain clone of the same checkpoint loads next, or the model is unloaded, ComfyUI first removes the object patches
and only then restores that dict by path, which no longer resolves ("'CrossAttention' object has no attribute
'linfusion'"). An injection's eject runs before every detach and unpatch of our clone, so there we hand those
parameters their originals back ourselves, on our own modules, and drop their entries.

LoRAs: the released SD-1.5 / SD-2.1 files carry LinFusion's own ``to_q/to_k/to_v/to_out``, and those are what run.
A LoRA names the base layer's projections, whose keys still resolve (they stay in our module under their own names,
for the softmax fallback). Before every sampling run each such weight patch is also put on the matching LinFusion
projection, so LoRAs loaded before or after Apply LinFusion reach the attention that runs.

Multi-GPU (0.33+): ``ModelPatcher.deepclone_multigpu`` and ``match_multigpu_clones`` give another copy of the model
our object patches, which still hold the first copy's modules and weights. The callbacks rebuild them over the
copy's own modules.
"""
from __future__ import annotations

import copy
import logging
import uuid

import comfy.patcher_extension as pe
import comfy.utils

from ..linfusion_core.chunked import TokenChunkedFeedForward
from ..linfusion_core.layer import LinFusionAttention
from .memory import preload_with_estimate

log = logging.getLogger("LinFusion")

KEY = "linfusion"
PROJECTIONS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
OUR_TYPES = (LinFusionAttention, TokenChunkedFeedForward)


def our_patches(patcher) -> dict:
    return {k: v for k, v in patcher.object_patches.items() if isinstance(v, OUR_TYPES)}


def _owner(ours: dict, key: str):
    """(our module, path below it) for a parameter path under one of our object patches, else (None, None)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = ours.get(".".join(parts[:i]))
        if mod is not None:
            return mod, ".".join(parts[i:])
    return None, None


def hand_back_own_weights(patcher) -> int:
    """Restore, on our own modules, the parameters (and buffers) that a dynamic load backed up under our object
    patches, and drop those entries from the shared backup dicts. Returns how many. Classic patchers restore
    their backups before they remove object patches, so they are left alone (and may still need them)."""
    if not (hasattr(patcher, "is_dynamic") and patcher.is_dynamic()):
        return 0
    ours = our_patches(patcher)
    n = 0
    for key in list(patcher.backup):
        mod, rest = _owner(ours, key)
        if mod is None:
            continue
        bk = patcher.backup.pop(key)
        if bk.inplace_update:
            comfy.utils.copy_to_param(mod, rest, bk.weight)
        else:
            comfy.utils.set_attr_param(mod, rest, bk.weight)
        n += 1
    for key in list(getattr(patcher, "backup_buffers", {})):
        mod, rest = _owner(ours, key)
        if mod is not None:
            comfy.utils.set_attr_buffer(mod, rest, patcher.backup_buffers.pop(key))
            n += 1
    return n


def _base_of(module):
    while isinstance(module, OUR_TYPES):
        module = module._base
    return module


def rebuilt_over(obj, base):
    """A copy of our module ``obj`` over ``base`` (the same layer in another copy of the model)."""
    if isinstance(obj, LinFusionAttention):
        return LinFusionAttention(base, copy.deepcopy(obj.linfusion), obj.softmax_below_tokens, obj.label)
    return TokenChunkedFeedForward(base, obj.chunk_elements)


def rebind(src_patches: dict, target, reset_tree: bool = False) -> int:
    """Put our object patches ``src_patches`` on ``target`` (a ModelPatcher over another copy of the model), rebuilt
    over that copy's own modules. ``reset_tree``: the copy was deep-copied while patched, so our modules sit in its
    module tree; put its own modules back there first."""
    for key, obj in src_patches.items():
        here = comfy.utils.get_attr(target.model, key)
        base = _base_of(here)
        if reset_tree and here is not base:
            comfy.utils.set_attr(target.model, key, base)
        target.add_object_patch(key, rebuilt_over(obj, base))
    return len(src_patches)


def _on_multigpu_clone(src, clone):
    rebind(our_patches(src), clone)


def mirror_projection_patches(patcher) -> int:
    """Give each LinFusion layer's own projections the weight patches (LoRA deltas) that ``patcher`` holds for the
    base layer's projections of the same name; drop mirrored ones whose source is gone. Returns how many keys
    changed (then the patches' uuid changes too, so ComfyUI re-patches the weights on the next load)."""
    changed = 0
    for key, layer in our_patches(patcher).items():
        if not isinstance(layer, LinFusionAttention) or not layer.linfusion.own_projections:
            continue
        for name in PROJECTIONS:
            src, dst = f"{key}.{name}", f"{key}.linfusion.{name}"
            want, have = patcher.patches.get(src, []), patcher.patches.get(dst, [])
            if len(want) == len(have) and all(a is b for a, b in zip(want, have)):
                continue
            if want:
                patcher.patches[dst] = list(want)
            else:
                patcher.patches.pop(dst, None)
            changed += 1
    if changed:
        patcher.patches_uuid = uuid.uuid4()
    return changed


def bypasses(model_options: dict) -> list:
    """What in these model options would run instead of the LinFusion layers, or be ignored by them."""
    to = (model_options or {}).get("transformer_options", {})
    found = []
    replace = to.get("patches_replace", {}).get("attn1", {})
    if replace:
        names = ", ".join(map(str, list(replace)[:4])) + (", ..." if len(replace) > 4 else "")
        found.append(f"{len(replace)} attn1 replace patch(es) ({names}): ComfyUI calls those instead of the attention "
                     "module, so LinFusion is bypassed in those blocks (they run that patch's attention)")
    override = to.get("optimized_attention_override")
    if override is not None:
        name = getattr(override, "__qualname__", None) or type(override).__name__
        found.append(f"an optimized_attention_override ({name}): LinFusion's layers do not call ComfyUI's attention "
                     "functions, so it applies only to cross-attention and to layers on the softmax fallback")
    return found


def hooked_projections(patcher) -> list:
    """Weight hooks (ComfyUI's "Create Hook LoRA" nodes) on the base projections of layers that run LinFusion's
    own projections: those deltas reach only the softmax fallback."""
    own = [k for k, layer in our_patches(patcher).items()
           if isinstance(layer, LinFusionAttention) and layer.linfusion.own_projections]
    hooked = {key for patches in getattr(patcher, "hook_patches", {}).values() for key in patches}
    hit = sorted(k for k in own if any(f"{k}.{name}" in hooked for name in PROJECTIONS))
    if not hit:
        return []
    return [f"LoRA hooks on the self-attention projections of {len(hit)} layer(s) ({', '.join(hit[:2])}"
            f"{', ...' if len(hit) > 2 else ''}): LinFusion runs its own projections there, so those deltas apply "
            "only where a layer falls back to softmax; load the LoRA with a LoRA loader instead"]


def prepare_sampling(executor, model, noise_shape, conds, *args, **kwargs):
    """PREPARE_SAMPLING wrapper of a patched clone, before ComfyUI loads it: LoRA deltas onto LinFusion's own
    projections, one warning per run for anything that bypasses LinFusion, then the load with the measured memory
    estimate."""
    mirror_projection_patches(model)
    options = kwargs.get("model_options")
    for what in bypasses(options if options is not None else model.model_options) + hooked_projections(model):
        log.warning("LinFusion: this run has %s.", what)
    return preload_with_estimate(executor, model, noise_shape, conds, *args, **kwargs)


def attach(patcher):
    """Register the DynamicVRAM hand-back, the sampling-time wrapper and the multi-GPU rebinding on a patched clone
    (once per key), and mirror the LoRA patches it already has."""
    patcher.set_injections(KEY, [pe.PatcherInjection(inject=lambda p: None, eject=hand_back_own_weights)])
    patcher.remove_wrappers_with_key(pe.WrappersMP.PREPARE_SAMPLING, KEY)
    patcher.add_wrapper_with_key(pe.WrappersMP.PREPARE_SAMPLING, KEY, prepare_sampling)
    mirror_projection_patches(patcher)
    for name in ("ON_DEEPCLONE_MULTIGPU", "ON_MATCH_MULTIGPU_CLONES"):  # ComfyUI 0.33+
        call_type = getattr(pe.CallbacksMP, name, None)
        if call_type is not None:
            patcher.remove_callbacks_with_key(call_type, KEY)
            patcher.add_callback_with_key(call_type, KEY, _on_multigpu_clone)
    return patcher
