"""Which UNet layer each LinFusion checkpoint entry belongs to.

The map is built from the model's own diffusers→ComfyUI key table (``comfy.utils.unet_to_diffusers``, passed in
by the caller so this module needs no ComfyUI), never from a hand-written list."""
from __future__ import annotations

import re

from .checkpoint import LinFusionCheckpoint, LinFusionFileError, family_from_layers

_SUFFIX = ".to_q.weight"
_BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def diffusers_attn1_layers(diffusers_to_comfy: dict) -> dict:
    """{diffusers attn1 path: ComfyUI attn1 path} for every self-attention layer of the UNet."""
    out = {}
    for dk, ck in diffusers_to_comfy.items():
        if dk.endswith(".attn1" + _SUFFIX):
            out[dk[: -len(_SUFFIX)]] = ck[: -len(_SUFFIX)]
    return out


def diffusers_module_order(name: str) -> tuple:
    """Sort key reproducing the order of diffusers' ``UNet2DConditionModel.named_modules()``: all down blocks,
    then all up blocks, then the mid block (registered after the up-block list), indices in numeric order."""
    head = name.split(".", 1)[0]
    nums = tuple(int(n) for n in re.findall(r"\.(\d+)(?=\.|$)", name))
    return (_BLOCK_ORDER.get(head, 3),) + nums


def layer_map(ckpt: LinFusionCheckpoint, diffusers_to_comfy: dict, model_desc: str = "the model") -> list:
    """[(LayerWeights, ComfyUI attn1 path)] in checkpoint order. Uses config.json module names when present,
    else the diffusers module order. Raises LinFusionFileError on any architecture mismatch."""
    layers = diffusers_attn1_layers(diffusers_to_comfy)
    ordered = sorted(layers, key=diffusers_module_order)
    mismatch = (f"LinFusion file '{ckpt.path}' ({ckpt.describe()}) does not fit {model_desc} "
                f"({len(ordered)} self-attention layers)")
    if len(ckpt.layers) != len(ordered):
        raise LinFusionFileError(mismatch)
    result = []
    for pos, lw in enumerate(ckpt.layers):
        if lw.module_name is not None:
            if lw.module_name not in layers:
                raise LinFusionFileError(f"{mismatch}: config.json names layer '{lw.module_name}', which this "
                                         f"model does not have")
            comfy_path = layers[lw.module_name]
        else:
            comfy_path = layers[ordered[pos]]
        result.append((lw, comfy_path))
    if len({p for _, p in result}) != len(result):
        raise LinFusionFileError(f"LinFusion file '{ckpt.path}': config.json names a layer twice")
    return result


def check_widths(ckpt: LinFusionCheckpoint, mapped: list, widths: dict, heads: dict, model_desc: str) -> None:
    """Each layer's width must equal the ComfyUI layer's; config heads (if any) must agree with the model.
    ``mapped``: [(LayerWeights, ComfyUI path, ...)]."""
    for lw, path, *_ in mapped:
        if widths[path] != lw.dim:
            raise LinFusionFileError(
                f"LinFusion file '{ckpt.path}' ({ckpt.describe()}) does not fit {model_desc}: layer {lw.index} is "
                f"{lw.dim} wide but {path} is {widths[path]} wide")
        if lw.heads is not None and lw.heads != heads[path]:
            raise LinFusionFileError(
                f"LinFusion file '{ckpt.path}' ({family_from_layers(ckpt.layers)}, config.json: {lw.heads} heads at "
                f"layer {lw.index}) does not fit {model_desc}: {path} has {heads[path]} heads")


def map_layers(ckpt: LinFusionCheckpoint, diffusers_to_comfy: dict, model_desc: str, only: tuple | None = None):
    """([(LayerWeights, ComfyUI attn1 path, diffusers name)], [(ComfyUI path, reason)]): the layers to patch, in the
    model's order, and those left out. ``diffusers_to_comfy`` is the key table of the whole UNet; ``only`` (diffusers
    name prefixes, e.g. a ControlNet's encoder: ``("down_blocks.", "mid_block.")``) restricts patching to part of it.

    The whole UNet must match the file layer for layer (``layer_map``). For a part, with config.json names each
    layer takes the weights of its same-named file layer, wherever that sits (so a ControlNet with fewer transformer
    blocks than its base UNet takes the weights of the layers it has); a layer the file has no weights for is left
    out. Without names, the file's order must be that of the whole UNet."""
    layers = diffusers_attn1_layers(diffusers_to_comfy)
    comfy_to_name = {c: d for d, c in layers.items()}
    if only is None:
        return [(lw, path, comfy_to_name[path]) for lw, path in layer_map(ckpt, diffusers_to_comfy, model_desc)], []
    part = {d: c for d, c in sorted(layers.items(), key=lambda kv: diffusers_module_order(kv[0])) if d.startswith(only)}
    if all(lw.module_name for lw in ckpt.layers):
        by_name = {lw.module_name: lw for lw in ckpt.layers}
    else:
        try:
            mapped = layer_map(ckpt, diffusers_to_comfy, f"a UNet built like {model_desc}")
        except LinFusionFileError as e:
            raise LinFusionFileError(
                f"{e}. The file has no config.json naming its layers, so they are taken in the order of the whole UNet "
                f"that {model_desc} mirrors, and that does not line up. If it has fewer transformer blocks than its "
                f"base model, put the released config.json beside the LinFusion file") from None
        by_name = {comfy_to_name[path]: lw for lw, path in mapped}
    found, skipped = [], []
    for name, path in part.items():
        if name in by_name:
            found.append((by_name[name], path, name))
        else:
            skipped.append((path, f"the LinFusion file has no weights for {name}"))
    return found, skipped
