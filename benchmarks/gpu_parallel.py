"""The GPU check's "parallel" section (benchmarks/gpu_check.py runs it in its own process): the one-rank overhead
of the spatial-parallel path (linfusion_core/parallel.py, issue 14) against the plain UNet call, on one GPU.

The SD-1.5 stand-in checkpoint of the prepare section with LinFusion applied (the pack's own code, classic
ModelPatcher); at each size one UNet call, batch 2, fp16: plain (the diffusion model called as ComfyUI's
apply_model calls it) against ``parallel.unet_step`` in a process group of one rank (NCCL on a GPU, gloo in the
CPU dry run), with the node's weight function. One rank exchanges nothing, so the ratio is the price of the
parallel path itself: its GroupNorm (statistics in fp32, all-reduced), its convolutions (halo bookkeeping) and its
LinFusion attention (torch einsum on the all-reduced state, not the single-GPU Triton kernel). The outputs are
compared (max relative difference). Peak torch.cuda.max_memory_allocated of each call.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

GPU = {"sizes": [[2048, 2048], [4096, 4096], [16384, 8192]], "batch": 2, "max_reps": 3, "target_s": 1.5}
DRY = {"sizes": [[64, 64]], "batch": 2, "max_reps": 1, "target_s": 0.0}


def child_parallel(spec: dict, rec, gc) -> None:
    """``gc``: the gpu_check module (its helpers)."""
    cfg, deadline = spec["cfg"], spec["deadline"]
    torch, mm, pack, cuda, env = gc.section_start(spec, rec)
    import gc as pygc
    import importlib
    from datetime import timedelta
    import torch.distributed as dist
    import comfy.sd
    sys.path.insert(0, str(BENCH))
    import unet_variants
    from harness.host import free_port
    from harness.peakmem import PeakRSS

    par = importlib.import_module(f"{pack.__name__}.linfusion_core.parallel")
    node = importlib.import_module(f"{pack.__name__}.nodes.parallel")
    unet = comfy.sd.load_checkpoint_guess_config(spec["ckpt_path"], output_vae=False, output_clip=False)[0]
    lf = pack.linfusion_core.checkpoint.load_checkpoint(spec["linfusion_path"])
    m = pack.nodes.patching.apply_linfusion(unet, lf, 0)
    mm.load_models_gpu([m])
    device = mm.get_torch_device()
    env["unet_dtype"] = str(m.model.get_dtype()).replace("torch.", "")
    env["backend"] = "nccl" if cuda else "gloo"
    dm = m.model.diffusion_model
    to = dict(m.model_options.get("transformer_options", {}))
    dtype = m.model.get_dtype() if cuda else torch.float32
    align = par.unet_align(dm)
    dist.init_process_group(env["backend"], init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=300))
    try:
        B = cfg["batch"]
        for w, h in cfg["sizes"]:
            what = f"sd15 {w}x{h}"
            if time.time() > deadline:
                rec.skip(what, "the section's time is spent")
                continue
            lh, lw = h // 8, w // 8
            row = {"size": [w, h], "latent": [lw, lh], "batch": B, "dtype": str(dtype).replace("torch.", "")}
            try:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(B, 4, lh, lw, generator=gen).to(device, dtype)
                c = torch.randn(B, 77, 768, generator=gen).to(device, dtype)
                t = torch.tensor([500.0, 20.0] * B)[:B].to(device)
                calls = {
                    "plain": lambda xx: dm(xx, t, c, None, None, dict(to, original_shape=list(xx.shape))),
                    "parallel_1rank": lambda xx: par.unet_step(
                        dm, xx, t, c, bands=par.split_bands(xx.shape[-2], xx.shape[-1], 1, align),
                        transformer_options=dict(to, original_shape=list(xx.shape)), weight_fn=node._norm_weights),
                }
                outs = {}
                with torch.inference_mode():
                    for name, fn in calls.items():
                        fn(torch.randn(B, 4, 2 * align, 2 * align, device=device, dtype=dtype))  # warm-up
                        if cuda:
                            torch.cuda.synchronize()
                        times = []
                        meter = unet_variants.CudaPeak(torch) if cuda else PeakRSS()
                        with meter:
                            while True:
                                t0 = time.perf_counter()
                                out = fn(x)
                                if cuda:
                                    torch.cuda.synchronize()
                                times.append(time.perf_counter() - t0)
                                if (len(times) >= cfg["max_reps"] or sum(times) >= cfg["target_s"]
                                        or time.time() + times[-1] > deadline):
                                    break
                        times.sort()
                        row[name] = {"seconds": times[len(times) // 2], "seconds_all": times, "peak_bytes": meter.peak}
                        outs[name] = out.float().cpu()
                        del out
                a, b = outs["parallel_1rank"], outs["plain"]
                row["max_rel_diff"] = float((a - b).abs().max() / b.abs().max())
                row["ratio"] = row["parallel_1rank"]["seconds"] / row["plain"]["seconds"]
                gc.log(f"parallel {what}: plain {row['plain']['seconds']:.3f} s, 1 rank "
                       f"{row['parallel_1rank']['seconds']:.3f} s ({row['ratio']:.2f}x), diff {row['max_rel_diff']:.1e}")
            except Exception as e:
                gc.record_error(row, e, f"parallel {what}")
            rec.row(row)
            pygc.collect()
            if cuda:
                torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()


def markdown(sec: dict, gib) -> list:
    """The section's lines for the check's report."""
    if not sec or sec.get("status") == "not run":
        return []
    env = sec.get("env", {})
    L = ["## Spatial parallel: the one-rank overhead (linfusion_core/parallel.py)", "",
         f"SD-1.5 stand-in with LinFusion, {env.get('unet_dtype', '?')}, one rank ({env.get('backend', '?')}); "
         f"status {sec.get('status')}. Ratio = parallel path / plain call, same process.", "",
         "| image | batch | plain | 1 rank | ratio | max rel diff | peak plain | peak 1 rank |",
         "|---|---|---|---|---|---|---|---|"]
    for r in sec.get("rows", []):
        size = f"{r['size'][0]}×{r['size'][1]}"
        if "error" in r:
            L.append(f"| {size} | {r['batch']} | failed: {r['error'][:120]} | | | | | |")
            continue
        p, q = r["plain"], r["parallel_1rank"]
        L.append(f"| {size} | {r['batch']} | {p['seconds']:.3f} s | {q['seconds']:.3f} s | {r['ratio']:.2f}x | "
                 f"{r['max_rel_diff']:.1e} | {gib(p.get('peak_bytes'))} | {gib(q.get('peak_bytes'))} |")
    for s in sec.get("skipped", []):
        L.append(f"- skipped {s['what']}: {s['why']}")
    return L + [""]
