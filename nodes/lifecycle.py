"""What a patched ModelPatcher (UNet or ControlNet) needs beyond its object patches, so that ComfyUI's newer loaders
handle it like any other clone.

DynamicVRAM (``ModelPatcherDynamic``, ComfyUI 0.33+ on CUDA, on by default) force-casts small layers, LinFusion's
LayerNorms among them, and keeps the originals in a ``backup`` dict that every clone of one checkpoint shares,
keyed by parameter path. Our parameters' paths run through our object patches (``...attn1.linfusion.*``). When a
plain clone of the same checkpoint loads next, or the model is unloaded, ComfyUI first removes the object patches
and only then restores that dict by path, which no longer resolves ("'CrossAttention' object has no attribute
'linfusion'"). An injection's eject runs before every detach and unpatch of our clone, so there we hand those
parameters their originals back ourselves, on our own modules, and drop their entries.

Multi-GPU (0.33+): ``ModelPatcher.deepclone_multigpu`` and ``match_multigpu_clones`` give another copy of the model
our object patches, which still hold the first copy's modules and weights. The callbacks rebuild them over the
copy's own modules.
"""
from __future__ import annotations

import copy

import comfy.patcher_extension as pe
import comfy.utils

from ..linfusion_core.chunked import TokenChunkedFeedForward
from ..linfusion_core.layer import LinFusionAttention

KEY = "linfusion"
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


def attach(patcher):
    """Register the DynamicVRAM hand-back and the multi-GPU rebinding on a patched clone (once per key)."""
    patcher.set_injections(KEY, [pe.PatcherInjection(inject=lambda p: None, eject=hand_back_own_weights)])
    for name in ("ON_DEEPCLONE_MULTIGPU", "ON_MATCH_MULTIGPU_CLONES"):  # ComfyUI 0.33+
        call_type = getattr(pe.CallbacksMP, name, None)
        if call_type is not None:
            patcher.remove_callbacks_with_key(call_type, KEY)
            patcher.add_callback_with_key(call_type, KEY, _on_multigpu_clone)
    return patcher
