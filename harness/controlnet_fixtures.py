"""Stand-in ControlNets and T2I-Adapters with the true architectures and random weights, in the on-disk layouts
ComfyUI's ControlNetLoader accepts.

The models are built with ComfyUI's own classes (``comfy.cldm.cldm.ControlNet``, ``comfy.t2i_adapter.adapter``)
and saved as safetensors:

  layout "original"   ``control_model.*`` keys, as in lllyasviel's ControlNet-v1-1 files
  layout "diffusers"  diffusers ``ControlNetModel`` keys (down_blocks.*, controlnet_down_blocks.*,
                      controlnet_cond_embedding.*), which ComfyUI converts back with ``comfy.utils.unet_to_diffusers``

Variants: "sd15" (control_v11 style), "sdxl-mid" and "sdxl-small" (diffusers' controlnet-*-sdxl-1.0-mid/-small:
the SD-XL encoder with transformer depth 1 or 0 where the base has 2 and 10).

Run as a module in a subprocess (it imports ComfyUI):  python -m harness.controlnet_fixtures VARIANT LAYOUT OUT
Callers use ``ensure_controlnet(variant, layout)``, cached under <LINFUSION_HOST_DIR>/fixtures.
The tile-ControlNet workflow wants ``models/controlnet/control_v11f1e_sd15_tile.safetensors``: ``install_controlnet``
places ``ensure_controlnet("sd15")`` there (a hard link, else a copy).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .fixtures import UNET_CONFIGS, fixtures_dir, randomize_

FIXTURE_VERSION = 1
WORKFLOW_CONTROLNET_NAME = "control_v11f1e_sd15_tile.safetensors"
LAYOUTS = ("original", "diffusers")

_SDXL_SMALLER = dict(UNET_CONFIGS["sdxl"], transformer_depth_output=[0] * 9)
# The ControlNet configurations ComfyUI itself lists (comfy/model_detection.py SDXL_mid_cnet / SDXL_small_cnet).
CONTROLNET_CONFIGS = {
    "sd15": UNET_CONFIGS["sd15"],
    "sd21": UNET_CONFIGS["sd21"],
    "sdxl": UNET_CONFIGS["sdxl"],
    "sdxl-mid": dict(_SDXL_SMALLER, transformer_depth=[0, 0, 0, 0, 1, 1], transformer_depth_middle=1,
                     transformer_depth_output=[0, 0, 0, 0, 0, 0, 1, 1, 1]),
    "sdxl-small": dict(_SDXL_SMALLER, transformer_depth=[0] * 6, transformer_depth_middle=0, context_dim=1),
}


def controlnet_config(variant: str) -> dict:
    cfg = dict(CONTROLNET_CONFIGS[variant])
    cfg.pop("out_channels", None)
    cfg["hint_channels"] = 3
    return cfg


def build_controlnet(variant: str, dtype=None, seed: int = 7):
    """A comfy.cldm.cldm.ControlNet for ``variant`` with deterministic random weights (needs ComfyUI imported)."""
    import comfy.cldm.cldm
    import comfy.ops
    import torch
    dtype = dtype or torch.float32
    model = comfy.cldm.cldm.ControlNet(**controlnet_config(variant), dtype=dtype, device="cpu",
                                      operations=comfy.ops.disable_weight_init)
    randomize_(model, seed=seed, dtype=dtype)
    return model


def _hint_block_names(sd: dict) -> dict:
    """input_hint_block.{2c} <-> controlnet_cond_embedding.{conv_in, blocks.c-1, conv_out} (see the loader)."""
    convs = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.")})
    out = {}
    for c, idx in enumerate(convs):
        name = "conv_in" if c == 0 else ("conv_out" if c == len(convs) - 1 else f"blocks.{c - 1}")
        for s in ("weight", "bias"):
            out[f"input_hint_block.{idx}.{s}"] = f"controlnet_cond_embedding.{name}.{s}"
    return out


def to_layout(sd: dict, variant: str, layout: str) -> dict:
    """A ComfyUI-named ControlNet state dict in ``layout``."""
    if layout == "original":
        return {f"control_model.{k}": v for k, v in sd.items()}
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
    import comfy.utils
    cfg = controlnet_config(variant)
    comfy_to_diff = {c: d for d, c in comfy.utils.unet_to_diffusers(cfg).items()}
    comfy_to_diff.update(_hint_block_names(sd))
    comfy_to_diff.update({"middle_block_out.0.weight": "controlnet_mid_block.weight",
                          "middle_block_out.0.bias": "controlnet_mid_block.bias"})
    for k in sd:
        if k.startswith("zero_convs."):
            i, s = k.split(".")[1], k.rsplit(".", 1)[1]
            comfy_to_diff[k] = f"controlnet_down_blocks.{i}.{s}"
    missing = [k for k in sd if k not in comfy_to_diff]
    if missing:
        raise KeyError(f"no diffusers name for {missing[:5]}")
    return {comfy_to_diff[k]: v for k, v in sd.items()}


def build_file(variant: str, layout: str, out: Path) -> None:
    import torch
    from comfy.cli_args import args
    args.cpu = True
    import comfy.utils
    if variant == "t2i-adapter":
        sd = {k: v.to(torch.float16) for k, v in t2i_adapter_state_dict(channels=320).items()}
    else:
        model = build_controlnet(variant, dtype=torch.float16)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        del model
        sd = to_layout(sd, variant, layout)
    comfy.utils.save_torch_file(sd, str(out), metadata={"linfusion_fixture": json.dumps(
        {"kind": "controlnet", "variant": variant, "layout": layout})})


def ensure_controlnet(variant: str = "sd15", layout: str = "original") -> Path:
    """Path of the cached ControlNet file, generated (in a subprocess that imports ComfyUI) if missing.
    ``variant`` "t2i-adapter" (layout "original") is an SD-1.5 T2I-Adapter instead."""
    if variant == "t2i-adapter" and layout == "original":
        pass
    elif variant not in CONTROLNET_CONFIGS or layout not in LAYOUTS:
        raise KeyError(f"unknown ControlNet fixture {variant!r}/{layout!r}; known: {sorted(CONTROLNET_CONFIGS)} x "
                       f"{LAYOUTS}, and 't2i-adapter'")
    out = fixtures_dir() / f"controlnet-{variant}-{layout}-v{FIXTURE_VERSION}.safetensors"
    if out.exists():
        return out
    from .host import host_info
    info = host_info()
    tmp = out.with_name(out.name + f".{os.getpid()}.partial")
    t0 = time.time()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), info["comfyui"]])
    subprocess.run([info["python"], "-m", "harness.controlnet_fixtures", variant, layout, str(tmp)], check=True,
                   env=env, cwd=info["comfyui"])
    os.replace(tmp, out)
    print(f"[fixtures] generated {out.name} ({out.stat().st_size / 2**20:.0f} MiB) in {time.time() - t0:.0f}s",
          flush=True)
    return out


def install_controlnet(base_dir, name: str = WORKFLOW_CONTROLNET_NAME, variant: str = "sd15",
                       layout: str = "original") -> str:
    """Place a generated ControlNet in ``<base_dir>/models/controlnet/<name>``; returns the control_net_name."""
    src = ensure_controlnet(variant, layout)
    dst = Path(base_dir) / "models" / "controlnet" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        if dst.stat().st_ino == src.stat().st_ino:
            return name
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return name


def t2i_adapter_state_dict(channels: int = 32, seed: int = 9) -> dict:
    """A small full-size-layout T2I-Adapter (comfy.t2i_adapter.adapter.Adapter, SD-1.5 style: 3-channel hint
    unshuffled by 8), with ``channels`` at its first level. ComfyUI's loader recognises it by ``conv_in.weight``."""
    import comfy.t2i_adapter.adapter
    ad = comfy.t2i_adapter.adapter.Adapter(cin=64 * 3, channels=[channels, channels * 2, channels * 4, channels * 4],
                                           nums_rb=2, ksize=1, sk=True, use_conv=False)
    randomize_(ad, seed=seed)
    return {k: v.contiguous() for k, v in ad.state_dict().items()}


if __name__ == "__main__":
    build_file(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
