"""The GPU check's "lowmem" section (benchmarks/gpu_check.py runs it in its own process): one UNet step of the
SD-XL 16K stage (16384x8192 px, latent 2048x1024, batch 1 as ComfyUI runs cond and uncond when both do not fit,
fp16) with LinFusion, without and with the low-memory mode (nodes/lowmem.py), then SD-1.5's with the mode while
time lasts. Peak torch.cuda.max_memory_allocated with the weights resident, against issue 13's 16 GB (SD-XL) and
10 GB (SD-1.5); the UNet layer after which that peak was reached (``RunningPeaks``); the step's time (the mode's
cost); the estimate per mode; how far the mode moves the step's output (relative to the step without it).

The SD-XL stand-in (true architecture, random fp16 weights, harness/fixtures.randomize_) is built in memory where
the check runs: no 5 GB file to carry or write. LinFusion-XL-shaped weights (with their own projections, the
larger case) come from harness/linfusion_fixtures.

Dry run (--dry, CPU): the same code at 64x64 px on the SD-1.5 stand-in checkpoint the prepare section made
(an SD-XL UNet is 5 GB even in fp16, too much for the test suite beside the rest), peak RSS growth instead of
max_memory_allocated; the skip parking takes its CPU path there, its CUDA path (pinned memory, side stream) only
on a GPU.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# "also": further runs after the main one, while the section's time lasts (SD-1.5 16K with the mode: issue 13's
# other target, 10 GB).
GPU = {"family": "sdxl", "size": [16384, 8192], "batch": 1, "modes": ["off", "on"], "target_bytes": 16e9,
       "also": [{"family": "sd15", "modes": ["on"], "target_bytes": 10e9}]}
DRY = {"family": "sd15", "size": [64, 64], "batch": 1, "modes": ["off", "on"], "target_bytes": None}
CONTEXT = {"sd15": (768, None), "sdxl": (2048, 2816)}


def standin_unet(family: str, torch, mm):
    """A ModelPatcher over a true-architecture UNet with random fp16 weights, built in memory."""
    import comfy.model_detection
    import comfy.model_patcher
    from harness.fixtures import UNET_CONFIGS, randomize_
    mc = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIGS[family]))
    mc.set_inference_dtype(torch.float16, None)
    model = mc.get_model({}, device="cpu")
    randomize_(model.diffusion_model, seed=1, dtype=torch.float16)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


class RunningPeaks:
    """Where a step peaks, without disturbing the peak it measures: after each layer of each UNet block (the layers
    ComfyUI's UNet calls one by one: ``input_blocks.i.j``, ``middle_block.j``, ``output_blocks.i.j``, ``out``),
    the running maximum that ``read()`` returns (CUDA: ``max_memory_allocated``; CPU: peak RSS). The layer after
    which it last rose is where the step peaked."""

    def __init__(self, diffusion_model, read):
        self.read, self.seen, self.hooks = read, [], []
        layers = [(f"{name}.{i}.{j}", layer) for name in ("input_blocks", "output_blocks")
                  for i, block in enumerate(getattr(diffusion_model, name, None) or [])
                  for j, layer in enumerate(block)]
        layers += [(f"middle_block.{j}", layer) for j, layer in enumerate(getattr(diffusion_model, "middle_block",
                                                                                  None) or [])]
        if getattr(diffusion_model, "out", None) is not None:
            layers.append(("out", diffusion_model.out))
        for label, layer in layers:
            self.hooks.append(layer.register_forward_hook(self._hook(label)))

    def _hook(self, label):
        def hook(module, args, output):
            self.seen.append((label, int(self.read())))
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def peak_layer(self):
        """(label, running max) of the layer after which the running maximum reached its final value."""
        if not self.seen:
            return None, None
        top = max(v for _, v in self.seen)
        return next((label, v) for label, v in self.seen if v == top)


def child_lowmem(spec: dict, rec, gc) -> None:
    """``gc``: the gpu_check module (its helpers)."""
    cfg = spec["cfg"]
    torch, mm, pack, cuda, env = gc.section_start(spec, rec)
    runs = [cfg] + [dict(cfg, **extra) for extra in cfg.get("also", [])]
    for run in runs:
        _lowmem_run(run, spec, rec, gc, torch, mm, pack, cuda, env)


def _lowmem_run(cfg, spec, rec, gc, torch, mm, pack, cuda, env) -> None:
    import gc as pygc
    import comfy.sd
    sys.path.insert(0, str(BENCH))
    import unet_variants
    from harness import linfusion_fixtures
    from harness.fixtures import sampling_options
    from harness.peakmem import PeakRSS, proc_status

    deadline = spec["deadline"]
    family = cfg["family"]
    if time.time() > deadline:
        rec.skip(f"{family} runs", "the section's time is spent")
        return
    t = time.perf_counter()
    if family == "sd15" and spec.get("ckpt_path"):
        unet = comfy.sd.load_checkpoint_guess_config(spec["ckpt_path"], output_vae=False, output_clip=False)[0]
        lf_path = spec["linfusion_path"]
    else:
        unet = standin_unet(family, torch, mm)
        lf_path = linfusion_fixtures.write(family, Path(spec["base"]) / f"lowmem-linfusion-{family}.safetensors",
                                           layout="file", seed=0)
    lf = pack.linfusion_core.checkpoint.load_checkpoint(lf_path)
    rec.note(f"{family} stand-in UNet and LinFusion weights ready in {time.perf_counter() - t:.1f} s")
    env["unet_dtype"] = str(unet.model.get_dtype()).replace("torch.", "")
    device = mm.get_torch_device()
    w, h = cfg["size"]
    shape = [cfg["batch"], 4, h // 8, w // 8]
    ctx_dim, adm_dim = CONTEXT[family]
    off_out = None  # the step's output without the mode, to compare the mode's with (on the host, float32)
    for mode in cfg["modes"]:
        what = f"{family} {w}x{h} low_memory={mode}"
        if time.time() > deadline:
            rec.skip(what, "the section's time is spent")
            continue
        row = {"family": family, "size": [w, h], "latent": [w // 8, h // 8], "batch": cfg["batch"],
               "low_memory": mode, "dtype": env["unet_dtype"], "target_bytes": cfg.get("target_bytes")}
        m = None
        try:
            m = pack.nodes.patching.apply_linfusion(unet, lf, 0, mode)
            mm.load_models_gpu([m])
            row["weights_bytes"] = int(m.model_size())
            est = m.model.memory_required
            row["estimate_bytes"] = est(shape)
            if getattr(est, "low_memory", None):
                row["estimate_off_bytes"] = est(shape, low_memory=False)
                row["estimate_on_bytes"] = est(shape, low_memory=True)
            to = sampling_options(m)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=gen).to(device)
            cond = {"c_crossattn": torch.randn(shape[0], 77, ctx_dim, generator=gen).to(device)}
            if adm_dim:
                cond["y"] = torch.randn(shape[0], adm_dim, generator=gen).to(device)
            sigma = torch.full((shape[0],), 1.0, device=device)
            with torch.inference_mode():
                wx = torch.randn(shape[0], 4, 16, 16, device=device)  # lazy initialisation outside the measurement
                m.model.apply_model(wx, sigma, transformer_options=dict(to), **cond)
                if cuda:
                    torch.cuda.synchronize()
                meter = unet_variants.CudaPeak(torch) if cuda else PeakRSS()
                probe = RunningPeaks(m.model.diffusion_model,
                                     torch.cuda.max_memory_allocated if cuda else lambda: proc_status("VmHWM"))
                t = time.perf_counter()
                try:
                    with meter:
                        out = m.model.apply_model(x, sigma, transformer_options=dict(to), **cond)
                        if cuda:
                            torch.cuda.synchronize()
                finally:
                    probe.remove()
                row["seconds"] = time.perf_counter() - t
                label, value = probe.peak_layer()
                # (running maximum above the step's start: CUDA's allocator, or RSS on a CPU dry run)
                row["peak_layer"] = label
                row["peak_layer_bytes"] = None if value is None else value - meter.base
                row["layers_probed"] = len(probe.seen)
                row["finite"] = bool(torch.isfinite(out).all().item())
                out = out.float().cpu()
                if mode == "off":
                    off_out = out
                elif off_out is not None:  # the same inputs: how far the mode moves the step's output
                    row["relative_to_off"] = ((out.double() - off_out.double()).norm()
                                              / off_out.double().norm()).item()
                del out
            row["peak_bytes"] = meter.peak
            row["memory_method"] = ("torch.cuda.max_memory_allocated (peak_total_bytes: weights included; "
                                    "peak_bytes: above the step's start)" if cuda else
                                    "peak RSS growth (VmHWM) during the step")
            if cuda:
                row["peak_total_bytes"] = meter.total
            gc.log(f"lowmem {what}: {row['seconds']:.2f} s, peak +{meter.peak / 2**30:.2f} GiB"
                   + (f" ({meter.total / 2**30:.2f} GiB with the weights)" if cuda else ""))
        except Exception as e:
            gc.record_error(row, e, f"lowmem {what}")
        rec.row(row)
        del m
        mm.unload_all_models()
        pygc.collect()
        if cuda:
            torch.cuda.empty_cache()


def markdown(sec: dict, gib) -> list:
    """The section's lines for the check's report."""
    if not sec or sec.get("status") == "not run":
        return []
    env = sec.get("env", {})
    rows = sec.get("rows", [])
    L = ["## Low-memory mode: one LinFusion UNet step (nodes/lowmem.py)", "",
         f"{env.get('unet_dtype', '?')}; status {sec.get('status')}. Peak: "
         f"{(rows or [{}])[0].get('memory_method', '')}.", "",
         "| family | image | batch | low_memory | time | peak (step) | peak with weights | weights | estimate | "
         "target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['size'][0]}×{r['size'][1]}"
        if "error" in r:
            L.append(f"| {r['family']} | {size} | {r['batch']} | {r['low_memory']} | failed: {r['error'][:120]} "
                     "| | | | | |")
            continue
        tgt = r.get("target_bytes")
        total = r.get("peak_total_bytes")
        verdict = "–" if not (tgt and total) else f"{'within' if total <= tgt else 'over'} {tgt / 1e9:.0f} GB"
        L.append(f"| {r['family']} | {size} | {r['batch']} | {r['low_memory']} | {r['seconds']:.2f} s | "
                 f"{gib(r.get('peak_bytes'))} | {gib(total)} | {gib(r.get('weights_bytes'))} | "
                 f"{gib(r.get('estimate_bytes'))} | {verdict} |")
    L.append("")
    for r in rows:
        if r.get("relative_to_off") is not None:
            L.append(f"- {r['family']} low_memory={r['low_memory']}: output {r['relative_to_off']:.2e} relative "
                     f"to the same step without the mode ({r.get('dtype')})")
    for r in rows:
        if r.get("peak_layer"):
            L.append(f"- {r['family']} low_memory={r['low_memory']}: the step's running peak last rose in "
                     f"`{r['peak_layer']}` ({gib(r.get('peak_layer_bytes'))} above the step's start; "
                     f"{r.get('layers_probed')} layers probed)")
    for s in sec.get("skipped", []):
        L.append(f"- skipped {s['what']}: {s['why']}")
    return L + [""]
