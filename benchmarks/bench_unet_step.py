"""One SD-1.5 UNet step at true size (generated random weights, batch 1) at several resolutions:

  stock          ComfyUI's own attention, as ComfyUI selects it on this machine (the baseline)
  hypertile      ComfyUI's HyperTile node on the stock model, default settings
  linfusion      ApplyLinFusion (generated LinFusion-1-5 weights with their own projections)
  linfusion+thr  ApplyLinFusion with softmax_below_tokens=4096 (deep levels keep softmax)
  no-self-attn   every attn1 replaced by zero output: the floor no attention method can beat
  projections    every attn1 runs only its four stock projections (to_q/k/v, to_out of v): what any
                 attention method pays on top of the floor (diagnostic row)
  linfusion-core-off
                 LinFusion with its attention core replaced by v: MLPs and projections only, so
                 linfusion minus this row is the cost of the linear attention itself (diagnostic row)

Prints a markdown table (time, ratio to stock and to the floor, peak extra memory) and saves a log-log plot.
A configuration whose predicted time exceeds --time-limit (from its time at the previous size, x4 for linear
and x16 for quadratic methods) is skipped and marked so. Run with the harness Python:

    python benchmarks/bench_unet_step.py --sizes 512 1024 2048 --time-limit 300
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness.host import host_info  # noqa: E402
from harness.peakmem import PeakRSS  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--time-limit", type=float, default=300.0, help="skip a config predicted to take longer (s)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--configs", nargs="+", default=["stock", "hypertile", "linfusion", "linfusion+thr", "no-self-attn",
                                                      "projections", "linfusion-core-off"])
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    info = host_info()
    sys.path.insert(0, info["comfyui"])
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = args.device == "cpu"
    import torch
    import comfy.model_management as mm
    from harness import fixtures, linfusion_fixtures
    from harness.host import import_pack

    pack = import_pack()

    unet = fixtures.load_unet("sd15")
    lf_dir = Path(info["host_dir"]) / "fixtures" / "bench-linfusion-sd15"
    lf_file = lf_dir / "diffusion_pytorch_model.safetensors"
    if not lf_file.exists():
        linfusion_fixtures.write("sd15", lf_dir, layout="folder", seed=0)
    ck = pack.linfusion_core.checkpoint.load_checkpoint(lf_file)

    import unet_variants
    builders = unet_variants.builders(pack, unet, ck)
    core_off = unet_variants.install_core_switch(pack) if "linfusion-core-off" in args.configs else {"on": False}
    CudaPeak = unet_variants.CudaPeak
    quadratic = {"stock"}
    device = mm.get_torch_device()
    dtype = unet.model.get_dtype()
    results = {}
    last = {}
    for size in args.sizes:
        for name in args.configs:
            prev = last.get(name)
            if prev is not None:
                growth = 16 if name in quadratic else 4
                predicted = prev[1] * growth * (size / prev[0]) ** 2 / 4
                if predicted > args.time_limit:
                    results[(name, size)] = {"skipped": f"predicted {predicted:.0f}s > {args.time_limit:.0f}s"}
                    print(f"{name:14s} {size}px: skipped ({results[(name, size)]['skipped']})", flush=True)
                    continue
            core_off["on"] = name == "linfusion-core-off"
            m = builders[name]()
            mm.load_models_gpu([m])
            to = dict(m.model_options.get("transformer_options", {}))
            x = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=torch.float32)
            c = torch.randn(1, 77, 768, device=device)
            sigma = torch.tensor([1.0], device=device)
            to["original_shape"] = list(x.shape)
            with torch.inference_mode():
                m.model.apply_model(torch.randn(1, 4, 16, 16, device=device), sigma, c_crossattn=c,
                                    transformer_options=dict(to, original_shape=[1, 4, 16, 16]))
                meter = CudaPeak(torch) if device.type == "cuda" else PeakRSS()
                with meter:
                    t0 = time.perf_counter()
                    m.model.apply_model(x, sigma, c_crossattn=c, transformer_options=to)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
            results[(name, size)] = {"seconds": dt, "peak_bytes": meter.peak}
            last[name] = (size, dt)
            print(f"{name:14s} {size}px: {dt:8.2f} s  peak +{meter.peak / 2**20:8.0f} MiB", flush=True)
            del m
            mm.unload_all_models()
            gc.collect()

    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads")
    lines = [f"One SD-1.5 UNet step, batch 1, {str(dtype).replace('torch.', '')}, {machine}; ratios against stock "
             f"and against the no-self-attention floor, measured in this process.", "",
             "| size | config | time | vs stock | vs floor | peak extra memory |", "|---|---|---|---|---|---|"]
    for size in args.sizes:
        stock = results.get(("stock", size), {}).get("seconds")
        floor = results.get(("no-self-attn", size), {}).get("seconds")
        for name in args.configs:
            r = results.get((name, size), {})
            if "skipped" in r:
                lines.append(f"| {size}² | {name} | skipped ({r['skipped']}) | | | |")
                continue
            if not r:
                continue
            vs_stock = f"{stock / r['seconds']:.2f}× faster" if stock else "–"
            vs_floor = f"{r['seconds'] / floor:.2f}×" if floor else "–"
            lines.append(f"| {size}² | {name} | {r['seconds']:.2f} s | {vs_stock} | {vs_floor} | "
                         f"{r['peak_bytes'] / 2**20:.0f} MiB |")
    table = "\n".join(lines)
    print()
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"unet_step_{device.type}.md").write_text(table + "\n")
    (args.out_dir / f"unet_step_{device.type}.json").write_text(json.dumps(
        {f"{k[0]}@{k[1]}": v for k, v in results.items()}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in args.configs:
            pts = [(s, results[(name, s)]) for s in args.sizes if "seconds" in results.get((name, s), {})]
            if pts:
                a1.loglog([p[0] for p in pts], [p[1]["seconds"] for p in pts], "o-", label=name)
                a2.loglog([p[0] for p in pts], [max(p[1]["peak_bytes"], 1) / 2**20 for p in pts], "o-", label=name)
        a1.set(xlabel="image side (px)", ylabel="seconds per UNet step", title="time")
        a2.set(xlabel="image side (px)", ylabel="peak extra memory (MiB)", title="memory")
        for a in (a1, a2):
            a.grid(True, which="both", alpha=0.3)
            a.legend()
        fig.suptitle(f"SD-1.5 UNet step, {machine}")
        fig.tight_layout()
        fig.savefig(args.out_dir / f"unet_step_{device.type}.png", dpi=110)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
