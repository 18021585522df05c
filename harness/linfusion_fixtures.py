"""Generated LinFusion weight files in the released formats (random weights, the true layer shapes).

The layer list is written out here from the diffusers UNet structure on purpose, independently of the pack's
own mapping code (linfusion_core.mapping), so that tests of the mapping can fail."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .fixtures import UNET_CONFIGS

CACHE_VERSION = 1  # bump when the generated tensors change


def diffusers_layers(family: str) -> list:
    """[{module_name, dim_n, heads, projection_mid_dim}] in diffusers ``named_modules()`` order:
    down blocks, up blocks, then the mid block."""
    cfg = UNET_CONFIGS[family]
    mults, nres, depth = cfg["channel_mult"], cfg["num_res_blocks"], cfg["transformer_depth"]
    depth_out = cfg["transformer_depth_output"][::-1]  # ComfyUI pops output depths from the end

    def heads(c):
        return cfg["num_heads"] if cfg.get("num_heads", -1) > 0 else c // cfg["num_head_channels"]

    def entry(name, c):
        return {"module_name": name, "dim_n": c, "heads": heads(c),
                "projection_mid_dim": c // 16 if family == "sdxl" else None}

    down, up = [], []
    k = 0
    for lvl, m in enumerate(mults):
        c = 320 * m
        for a in range(nres[lvl]):
            for t in range(depth[k]):
                down.append(entry(f"down_blocks.{lvl}.attentions.{a}.transformer_blocks.{t}.attn1", c))
            k += 1
    k = 0
    for j, lvl in enumerate(reversed(range(len(mults)))):
        c = 320 * mults[lvl]
        for a in range(nres[lvl] + 1):
            for t in range(depth_out[k]):
                up.append(entry(f"up_blocks.{j}.attentions.{a}.transformer_blocks.{t}.attn1", c))
            k += 1
    c = 320 * mults[-1]
    mid = [entry(f"mid_block.attentions.0.transformer_blocks.{t}.attn1", c)
           for t in range(cfg["transformer_depth_middle"])]
    return down + up + mid


def layer_tensors(c: int, mid: int, gen: torch.Generator, projections: bool = True) -> dict:
    def rnd(*shape, std):
        return torch.randn(*shape, generator=gen) * std
    t = {}
    for mlp in ("to_q_", "to_k_"):
        t[f"{mlp}.0.weight"] = rnd(mid, c, std=c ** -0.5)
        t[f"{mlp}.0.bias"] = rnd(mid, std=0.02)
        t[f"{mlp}.1.weight"] = 1 + rnd(mid, std=0.1)
        t[f"{mlp}.1.bias"] = rnd(mid, std=0.1)
        t[f"{mlp}.3.weight"] = rnd(c, mid, std=0.5 * mid ** -0.5)
        t[f"{mlp}.3.bias"] = rnd(c, std=0.02)
    if projections:
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            t[f"{p}.weight"] = rnd(c, c, std=c ** -0.5)
        t["to_out.0.bias"] = rnd(c, std=0.02)
    return t


def write(family: str, out: Path, layout: str = "folder", seed: int = 0, projections: bool = True,
          dtype=torch.float16, order=None) -> Path:
    """Write a LinFusion checkpoint for ``family``. layout: "folder" (config.json + diffusion_pytorch_model
    .safetensors inside ``out``) or "file" (``out`` is the lone .safetensors). ``order`` permutes the layers
    (a list of indices into the true order) to make deliberately wrong files. Returns the safetensors path.

    The tensors are generated once per (family, seed, projections, dtype, order) into the fixtures cache and
    hard-linked into place (copied where a link cannot be made): the suite writes dozens of these 0.2-0.9 GB
    files, and a CI disk must hold them for two hosts. Nothing may write into a returned file in place."""
    modules = diffusers_layers(family)
    if order is not None:
        modules = [modules[i] for i in order]
    out = Path(out)
    if layout == "folder":
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": modules}, indent=1))
        st = out / "diffusion_pytorch_model.safetensors"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        st = out
    cached = _cached_tensors(family, modules, seed, projections, dtype, order)
    st.unlink(missing_ok=True)  # a link left by an earlier run: replace the name, never write through it
    try:
        os.link(cached, st)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(cached, st)
    return st


def _cached_tensors(family: str, modules: list, seed: int, projections: bool, dtype, order) -> Path:
    from .fixtures import fixtures_dir
    key = f"{family}-s{seed}-{'proj' if projections else 'noproj'}-{str(dtype).replace('torch.', '')}"
    if order is not None:
        key += "-o" + hashlib.sha256(json.dumps(list(order)).encode()).hexdigest()[:12]
    cached = fixtures_dir() / "linfusion" / f"{key}-v{CACHE_VERSION}.safetensors"
    if cached.exists():
        return cached
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    per_name = {}
    for m in diffusers_layers(family):  # weights are tied to the layer name, whatever the file order
        c = m["dim_n"]
        per_name[m["module_name"]] = layer_tensors(c, m["projection_mid_dim"] or c, gen, projections)
    tensors = {}
    for i, m in enumerate(modules):
        for k, v in per_name[m["module_name"]].items():
            tensors[f"{i}.{k}"] = v.to(dtype).contiguous()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    save_file(tensors, str(tmp))
    os.replace(tmp, cached)  # atomic: concurrent writers (server and test process) agree on one file
    return cached
