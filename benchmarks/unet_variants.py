"""The UNet variants the step benchmarks compare, built on one loaded ComfyUI model (a ModelPatcher).

Shared by benchmarks/bench_unet_step.py and benchmarks/gpu_check.py. Import after ComfyUI's modules are
importable (the host path on sys.path) and with the pack imported as a package (``harness.host.import_pack``):

  stock          the model as ComfyUI runs it (ComfyUI's own attention)
  hypertile      ComfyUI's HyperTile node on the stock model, default settings
  linfusion      ApplyLinFusion (softmax_below_tokens 0)
  linfusion+thr  ApplyLinFusion with softmax_below_tokens=4096 (deep levels keep softmax)
  no-self-attn   every attn1 replaced by zero output: the floor no attention method can beat
  projections    every attn1 runs only its four stock projections (diagnostic)
  linfusion-core-off
                 LinFusion with its attention core replaced by v (diagnostic; see ``install_core_switch``)
"""
from __future__ import annotations

import torch


class ZeroAttention(torch.nn.Module):
    """attn1 replaced by zeros: what a UNet step costs with no self-attention at all."""

    def forward(self, x, *a, **kw):
        return torch.zeros_like(x)


class ProjectionsOnly(torch.nn.Module):
    """attn1 running only to_q, to_k, to_v and to_out (of v): what any attention method pays on top of the floor."""

    def __init__(self, base):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = base.to_q, base.to_k, base.to_v, base.to_out

    def forward(self, x, *a, **kw):
        self.to_q(x), self.to_k(x)
        return self.to_out(self.to_v(x))


def no_self_attn(pack, unet):
    m = unet.clone()
    for path in pack.nodes.patching.attn1_modules(unet):
        m.add_object_patch(f"diffusion_model.{path}", ZeroAttention())
    return m


def projections_only(pack, unet):
    m = unet.clone()
    for path, base in pack.nodes.patching.attn1_modules(unet).items():
        m.add_object_patch(f"diffusion_model.{path}", ProjectionsOnly(base))
    return m


def hypertile(unet):
    from comfy_extras import nodes_hypertile
    out = nodes_hypertile.HyperTile.execute(unet, 256, 2, 0, False)
    return out.result[0] if hasattr(out, "result") else out[0]


def install_core_switch(pack) -> dict:
    """Route the layer module's ``linear_attention`` (looked up at call time) through a switch, for the
    linfusion-core-off row: while ``switch["on"]`` is True the attention core returns v."""
    layer_mod = pack.linfusion_core.layer
    real_attention = getattr(layer_mod, "_bench_real_attention", layer_mod.linear_attention)
    layer_mod._bench_real_attention = real_attention
    switch = {"on": False}
    layer_mod.linear_attention = lambda q, k, v, heads: v if switch["on"] else real_attention(q, k, v, heads)
    return switch


def builders(pack, unet, ckpt) -> dict:
    """{config name: () -> model}. ``ckpt``: a loaded LinFusion checkpoint. linfusion-core-off builds the plain
    LinFusion model; the row needs ``install_core_switch`` turned on while it runs."""
    apply = pack.nodes.patching.apply_linfusion
    return {
        "stock": lambda: unet,
        "hypertile": lambda: hypertile(unet),
        "linfusion": lambda: apply(unet, ckpt, 0),
        "linfusion+thr": lambda: apply(unet, ckpt, 4096),
        "no-self-attn": lambda: no_self_attn(pack, unet),
        "projections": lambda: projections_only(pack, unet),
        "linfusion-core-off": lambda: apply(unet, ckpt, 0),
    }


class CudaPeak:
    """Peak of torch.cuda.max_memory_allocated above the allocation at entry, during a block."""

    def __init__(self, torch_mod=torch):
        self.torch = torch_mod

    def __enter__(self):
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        self.base = self.torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        self.torch.cuda.synchronize()
        self.total = self.torch.cuda.max_memory_allocated()
        self.peak = self.total - self.base
