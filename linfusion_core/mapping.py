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
    """Each layer's width must equal the ComfyUI layer's; config heads (if any) must agree with the model."""
    for lw, path in mapped:
        if widths[path] != lw.dim:
            raise LinFusionFileError(
                f"LinFusion file '{ckpt.path}' ({ckpt.describe()}) does not fit {model_desc}: layer {lw.index} is "
                f"{lw.dim} wide but {path} is {widths[path]} wide")
        if lw.heads is not None and lw.heads != heads[path]:
            raise LinFusionFileError(
                f"LinFusion file '{ckpt.path}' ({family_from_layers(ckpt.layers)}, config.json: {lw.heads} heads at "
                f"layer {lw.index}) does not fit {model_desc}: {path} has {heads[path]} heads")
