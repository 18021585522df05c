"""LinFusion's one-pass tiled VAE against ComfyUI's VAEDecodeTiled / VAEEncodeTiled, in one process, on this CPU.

    flock /work/heavy.lock .host/venv/bin/python benchmarks/bench_vae_tiled.py --sizes 512x512 1024x512 2048x1024 \
        --tile 512 --overlap 64 --untiled-max-px 2097152 --out benchmarks/results/vae_tiled_cpu.json

For each image size (width x height) and direction: wall time and peak RSS growth of ComfyUI's node, of ours (same
tile_size and overlap: the node inputs), and of ComfyUI's untiled VAE.decode / VAE.encode where the image has at
most --untiled-max-px pixels; the distance (max and mean absolute, images in ComfyUI's [0, 1] range, latents raw)
of each tiled result to the untiled one. The VAE is the SD-1.5/SD-XL KL architecture with random weights (seed 3,
as harness/fixtures.py makes it), fp32 on the CPU (what ComfyUI picks on a CPU). The decode input is random
normal; the encode input a smooth synthetic image. Runs are interleaved per size, so machine load hits both.
``--append`` merges rows into an existing JSON, so sizes can run as separate (shorter) jobs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.peakmem import PeakRSS  # noqa: E402


def measure(fn):
    """(result, seconds, peak RSS growth) of ``fn()``."""
    with PeakRSS() as p:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return out, dt, p.peak


def dist(a, b):
    d = (a.float() - b.float()).abs()
    return {"max": float(d.max()), "mean": float(d.mean())}


def synthetic_image(w, h, torch):
    y = torch.linspace(0, 1, h).view(h, 1)
    x = torch.linspace(0, 1, w).view(1, w)
    r = 0.5 + 0.4 * torch.sin(2 * math.pi * (3 * x + 2 * y))
    g = 0.5 + 0.4 * torch.cos(2 * math.pi * (5 * x * y + x))
    b = 0.5 + 0.4 * torch.sin(2 * math.pi * 7 * (x - y) ** 2)
    img = torch.stack([r, g, b], -1).unsqueeze(0)
    return img.clamp(0, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["512x512", "1024x512", "2048x1024"])
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--untiled-max-px", type=int, default=2048 * 1024)
    ap.add_argument("--what", nargs="+", default=["decode", "encode"])
    ap.add_argument("--skip-comfy-above-px", type=int, default=1 << 62,
                    help="run ComfyUI's tiled node only up to this many pixels (it takes hours at 4096x2048 here)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/vae_tiled_cpu.json"))
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()

    from harness.host import host_info
    info = host_info()
    sys.path.insert(0, info["comfyui"])
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd
    import nodes as comfy_nodes
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from harness.fixtures import VAE_DDCONFIG, randomize_
    from harness.host import import_pack

    pack = import_pack("LinFusionBench")
    m = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    randomize_(m, seed=3)
    vae = comfy.sd.VAE(sd=m.state_dict())
    del m
    ours_dec = pack.NODE_CLASS_MAPPINGS["LinFusionVAEDecodeTiled"]()
    ours_enc = pack.NODE_CLASS_MAPPINGS["LinFusionVAEEncodeTiled"]()
    comfy_dec, comfy_enc = comfy_nodes.VAEDecodeTiled(), comfy_nodes.VAEEncodeTiled()

    out_path = Path(a.out)
    doc = json.loads(out_path.read_text()) if a.append and out_path.exists() else {"rows": []}
    doc.update({
        "date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads", "torch": torch.__version__, "vae_dtype": str(vae.vae_dtype),
        "tile_size": a.tile, "overlap": a.overlap,
        "command": " ".join(["benchmarks/bench_vae_tiled.py"] + sys.argv[1:]),
    })
    rows = [r for r in doc["rows"] if not (r["size"] in a.sizes and r["what"] in a.what)]
    for size in a.sizes:
        w, h = (int(v) for v in size.split("x"))
        px = w * h
        for what in a.what:
            row = {"size": size, "what": what}
            with torch.inference_mode():
                if what == "decode":
                    z = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
                    run_ours = lambda: ours_dec.decode({"samples": z}, vae, a.tile, a.overlap)[0]  # noqa: E731
                    run_comfy = lambda: comfy_dec.decode(vae, {"samples": z}, a.tile, a.overlap)[0]  # noqa: E731
                    run_full = lambda: vae.decode(z)  # noqa: E731
                else:
                    img = synthetic_image(w, h, torch)
                    run_ours = lambda: ours_enc.encode(img, vae, a.tile, a.overlap)[0]["samples"]  # noqa: E731
                    run_comfy = lambda: comfy_enc.encode(vae, img, a.tile, a.overlap)[0]["samples"]  # noqa: E731
                    run_full = lambda: vae.encode(img)  # noqa: E731
                full = None
                if px <= a.untiled_max_px:
                    full, row["untiled_s"], row["untiled_peak_bytes"] = measure(run_full)
                    print(f"{size} {what} untiled {row['untiled_s']:.1f}s", flush=True)
                ours, row["ours_s"], row["ours_peak_bytes"] = measure(run_ours)
                print(f"{size} {what} ours {row['ours_s']:.1f}s {row['ours_peak_bytes'] / 2**30:.2f} GiB", flush=True)
                if full is not None:
                    row["ours_dist"] = dist(ours, full)
                del ours
                if px <= a.skip_comfy_above_px:
                    comfy_out, row["comfy_s"], row["comfy_peak_bytes"] = measure(run_comfy)
                    print(f"{size} {what} comfy {row['comfy_s']:.1f}s", flush=True)
                    if full is not None:
                        row["comfy_dist"] = dist(comfy_out, full)
                    row["speedup"] = row["comfy_s"] / row["ours_s"]
                    del comfy_out
                del full
            rows.append(row)
            doc["rows"] = rows
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(doc, indent=1))
            print(json.dumps(row), flush=True)
    out_path.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc) -> str:
    def gib(v):
        return f"{v / 2**30:.2f}" if v is not None else "-"

    def f(v, fmt="{:.1f}"):
        return fmt.format(v) if v is not None else "-"

    def small(v, fmt):
        return f"{v:.1e}" if 0 < v < 1e-3 else fmt.format(v)

    def d(r, k):
        return f"{small(r[k]['max'], '{:.4f}')} / {small(r[k]['mean'], '{:.5f}')}" if k in r else "-"
    lines = [f"# Tiled VAE on the CPU ({doc['date']}, {doc['machine']}, torch {doc['torch']}, {doc['vae_dtype']})", "",
             f"tile_size {doc['tile_size']}, overlap {doc['overlap']} (both nodes). `{doc['command']}`", "",
             "| size | what | ComfyUI tiled s | ours s | speed-up | untiled s | peak GiB ComfyUI / ours / untiled "
             "| dist. to untiled, ComfyUI (max / mean) | ours (max / mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(dict.fromkeys(r["size"] for r in doc["rows"]))}
    for r in sorted(doc["rows"], key=lambda r: (order[r["size"]], r["what"])):
        lines.append(f"| {r['size']} | {r['what']} | {f(r.get('comfy_s'))} | {f(r['ours_s'])} | "
                     f"{f(r.get('speedup'), '{:.2f}x')} | {f(r.get('untiled_s'))} | "
                     f"{gib(r.get('comfy_peak_bytes'))} / {gib(r['ours_peak_bytes'])} / "
                     f"{gib(r.get('untiled_peak_bytes'))} | {d(r, 'comfy_dist')} | {d(r, 'ours_dist')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
