"""Peak memory of one UNet step against latent size, stock attention vs LinFusion, on this CPU (fp32): the
measurement the memory estimate in nodes/memory.py is fitted to. Each (config, size) runs in a fresh process
(harness/step_memory.py), so freed pages of an earlier step cannot hide a later peak.

    python benchmarks/bench_step_memory.py --family sdxl --sizes 1024x512 1024x1024 2048x1024 2048x2048 \
        --batch2 1024x1024 --stock-max-px 32768

Prints a markdown table (peak growth, ComfyUI's formula, the patched model's estimate and its ratio to the
peak) and the least-squares lines peak = a x latent px x batch + b through the LinFusion points, one below and
one above the size where the feed-forward runs in token chunks: what ``Family.memory`` in linfusion_core/families.py holds (fp32
bytes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.host import host_info  # noqa: E402
from linfusion_core.chunked import is_chunked  # noqa: E402
from linfusion_core.families import BY_KEY  # noqa: E402


def is_chunked_row(family: str, latent_px: int, batch: int) -> bool:
    """Whether this row's first transformer level runs its feed-forward in token chunks (the estimate's
    second line)."""
    channels, area_divisor = BY_KEY[family].first_transformer_level
    return is_chunked(batch, latent_px // batch // area_divisor, channels)


def run_one(python: str, family: str, config: str, size: str, batch: int) -> dict:
    proc = subprocess.run([python, "-m", "harness.step_memory", "--family", family, "--config", config,
                           "--sizes", size, "--batch", str(batch)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} {size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(points: list) -> tuple[float, float]:
    """Least squares y = a x + b."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    a = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0
    return a, my - a * mx


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd15", "sd21", "sdxl"], default="sd15")
    ap.add_argument("--sizes", nargs="+", default=["512x256", "1024x512", "1536x768", "2048x1024", "3072x1536",
                                                     "4096x2048"])
    ap.add_argument("--batch2", nargs="*", default=["1024x512", "2048x1024"], help="sizes measured at batch 2 too")
    ap.add_argument("--stock-max-px", type=int, default=18432, help="largest latent px x batch for stock runs")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    python = host_info()["python"]

    runs = [(s, 1) for s in args.sizes] + [(s, 2) for s in args.batch2]
    rows = []
    for size, batch in runs:
        w, h = (int(v) for v in size.split("x"))
        px = batch * (w // 8) * (h // 8)
        row = {"size": size, "batch": batch, "latent_px": px}
        for config in ("stock", "linfusion"):
            if config == "stock" and px > args.stock_max_px:
                row["stock"] = None
                continue
            r = run_one(python, args.family, config, size, batch)
            m = r["sizes"][0]
            row[config] = m["peak"]
            row["formula"] = m["stock_formula"]
            if config == "linfusion":
                row["estimate"] = r["estimates"][0]
                row["model_config"], row["threads"] = r["model_config"], r["threads"]
            print(f"{config:9s} {size} x{batch}: peak +{m['peak'] / 1e6:8.0f} MB", flush=True)
        rows.append(row)

    for r in rows:
        r["ff_chunked"] = is_chunked_row(args.family, r["latent_px"], r["batch"])
    fits = {}
    for regime in (False, True):
        pts = [(r["latent_px"], r["linfusion"]) for r in rows if r["ff_chunked"] == regime]
        if len(pts) >= 2:
            fits["chunked" if regime else "unchunked"] = fit(pts)
    mb = lambda v: "–" if v is None else f"{v / 1e6:,.0f} MB".replace(",", " ")  # noqa: E731
    lines = [f"Peak RSS growth of one {args.family.upper()} UNet step ({rows[0]['model_config']}), CPU fp32, "
             f"{rows[0]['threads']} threads, a fresh process per cell; estimate = the patched model's "
             f"memory_required.", "",
             "| image | latent px × batch | FF chunked | stock attention | LinFusion | ComfyUI's formula | "
             "patched estimate | estimate / LinFusion |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['estimate'] / r['linfusion']:.2f}" if r.get("estimate") else "–"
        lines.append(f"| {r['size'].replace('x', '×')}{'' if r['batch'] == 1 else ', batch ' + str(r['batch'])} | "
                     f"{r['latent_px']} | {'yes' if r['ff_chunked'] else 'no'} | {mb(r['stock'])} | "
                     f"{mb(r['linfusion'])} | {mb(r['formula'])} | {mb(r.get('estimate'))} | {ratio} |")
    lines.append("")
    for regime, (a, b) in fits.items():
        lines.append(f"Least-squares line through the LinFusion peaks, feed-forward {regime}: {a:,.0f} B per "
                     f"latent px × batch + {b / 1e6:,.0f} MB (fp32).")
    table = "\n".join(lines)
    print()
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"step_memory_{args.family}_cpu"
    (args.out_dir / f"{stem}.md").write_text(table + "\n")
    fit_json = {k: {"per_pixel": a, "fixed": b} for k, (a, b) in fits.items()}
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"rows": rows, "fits": fit_json}, indent=1))


if __name__ == "__main__":
    main()
