"""Peak memory of one LinFusion UNet step with and without the low-memory mode (nodes/lowmem.py), on this CPU
(fp32), a fresh process per cell (harness/step_memory.py; parked skips go to a host pool allocated before the
peak is reset, so the peak is what a GPU would hold). Fits a line per family and mode and predicts the 16K
(16384x8192, latent 2048x1024) fp16 peak, weights included.

At 16K every patched feed-forward runs in token chunks (linfusion_core/chunked.py). The SD-1.5 sizes above are
past that threshold already; SD-XL's first transformer level is a quarter of the latent, so on this CPU (minutes
per SD-XL step) its cells run below it, and --ff-chunk-elements makes them chunk (1 M-element chunks: 5 to 10
chunks at these sizes, about 80 at 16K) so that the line has 16K's slope. In the same way
--attn-chunk-elements runs the mode's token-chunked LinFusion layers in 1 M-element chunks (at 16K the default 16 M
elements make 40 chunks of each of SD-1.5's first-level layers at batch 1; at these sizes one or two).

    python benchmarks/bench_lowmem.py --family sd15 --sizes 2048x1024 2560x1280 3072x1536 --attn-chunk-elements 1048576
    python benchmarks/bench_lowmem.py --family sdxl --sizes 1024x1024 1536x1024 2048x1024 --ff-chunk-elements 1048576 \
        --attn-chunk-elements 1048576
    python benchmarks/bench_lowmem.py --report        # tables + plot from the saved cells of both families

Since 2026-12-03 the mode also runs large convolutions by bands of rows; --band-elements 1048576 bands them at
these sizes as 16K bands them, and --name chunked_cpu keeps such cells apart (lowmem_cells_chunked_cpu.json, with
the commands in docs/benchmarks.md).

Cells are appended to benchmarks/results/lowmem_cells_cpu.json as they finish (a rerun of a cell replaces it);
--report writes benchmarks/results/lowmem_cpu.md and lowmem_cpu.png.
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
from bench_step_memory import fit  # noqa: E402  (the same least-squares line as the step-memory fits)

RESULTS = REPO / "benchmarks" / "results"
NAME = "cpu"  # --name: the set of cells (lowmem_cells_<name>.json) and its report (lowmem_<name>.md/.png, fits)
CELLS = RESULTS / f"lowmem_cells_{NAME}.json"
PX_16K = (16384 // 8) * (8192 // 8)  # latent px of a 16384x8192 image
TARGET = {"sdxl": 16e9, "sd15": 10e9}  # issue 13: peak GPU memory with the weights resident
FAMILY = {"sd15": "SD-1.5", "sdxl": "SD-XL"}


def run_cell(python: str, family: str, size: str, mode: str, batch: int = 1, ff_chunk_elements=None,
             attn_chunk_elements=None, band_elements=None, allocated: bool = False) -> dict:
    cmd = [python, "-m", "harness.step_memory", "--family", family, "--config", "linfusion", "--low-memory", mode,
           "--sizes", size, "--batch", str(batch)]
    if allocated:
        cmd += ["--allocated"]
    if ff_chunk_elements:
        cmd += ["--ff-chunk-elements", str(ff_chunk_elements)]
    if attn_chunk_elements:
        cmd += ["--attn-chunk-elements", str(attn_chunk_elements)]
    if band_elements:
        cmd += ["--band-elements", str(band_elements)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{family} {size} {mode} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    s = r["sizes"][0]
    return {"family": family, "size": size, "batch": batch, "mode": mode, "latent_px": s["latent_px"],
            "peak": s["peak"], "allocated_peak": s.get("allocated_peak"), "seconds": s["seconds"],
            "parked": s["parked"], "estimate": r["estimates"][0],
            "estimate_low_memory": (r.get("estimates_low_memory") or [None])[0],
            "weights_fp32": r["weights_bytes"], "threads": r["threads"], "command": " ".join(cmd[1:])}


def load_cells() -> list:
    return json.loads(CELLS.read_text()) if CELLS.exists() else []


def save_cell(cell: dict):
    cells = [c for c in load_cells() if (c["family"], c["size"], c["batch"], c["mode"]) !=
             (cell["family"], cell["size"], cell["batch"], cell["mode"])]
    cells.append(cell)
    RESULTS.mkdir(parents=True, exist_ok=True)
    CELLS.write_text(json.dumps(cells, indent=1))


def predict_16k(a: float, b: float, weights_fp32: int, batch: int = 1) -> dict:
    """fp16 peak at 16K: the per-pixel part halves with the activation size (as nodes/memory.py scales it), the
    fixed part is kept as measured (conservative), the weights are stored in fp16 (half the fp32 fixture)."""
    act = a * PX_16K * batch / 2 + b
    return {"activations": act, "weights": weights_fp32 / 2, "total": act + weights_fp32 / 2}


def _metric(cells) -> str:
    """Which peak the report uses: the allocator's (``--allocated`` cells, the counterpart of CUDA's
    max_memory_allocated) where every cell has it, else peak RSS."""
    return "allocated_peak" if cells and all(c.get("allocated_peak") for c in cells) else "peak"


def report() -> str:
    cells = [c for c in load_cells() if c["batch"] == 1]
    key = _metric(cells)
    cells = [{**c, "peak": c[key]} for c in cells]
    what = ("peak of the bytes live in torch's CPU allocator above the step's start (harness/peakmem.PeakAllocated)"
            if key == "allocated_peak" else "peak RSS growth")
    gb = lambda v: f"{v / 1e9:.2f} GB"  # noqa: E731
    mb = lambda v: f"{v / 1e6:,.0f} MB".replace(",", " ")  # noqa: E731
    lines = [f"One LinFusion UNet step, batch 1, fp32, CPU (2 threads), {what}, in a fresh process per cell; "
             "with the mode, the parked skips sit in a host pool outside the measured growth (on a GPU: host memory).",
             "", "| family | image | latent px | without the mode | with the mode | saved | parked skips | "
             "time without / with |", "|---|---|---|---|---|---|---|---|"]
    fits = {}
    for fam in ("sd15", "sdxl"):
        rows = {}
        for c in cells:
            if c["family"] == fam:
                rows.setdefault(c["size"], {})[c["mode"]] = c
        for size, r in sorted(rows.items(), key=lambda kv: next(iter(kv[1].values()))["latent_px"]):
            off, on = r.get("off"), r.get("on")
            px = (off or on)["latent_px"]
            saved = f"{100 * (1 - on['peak'] / off['peak']):.0f} %" if off and on else "–"
            lines.append(f"| {FAMILY[fam]} | {size.replace('x', '×')} | {px:,} | {mb(off['peak']) if off else '–'} | "
                         f"{mb(on['peak']) if on else '–'} | {saved} | {mb(on['parked']) if on else '–'} | "
                         f"{off['seconds']:.0f} s / {on['seconds']:.0f} s |".replace(",", " ")
                         if off and on else
                         f"| {FAMILY[fam]} | {size} | {px} | {mb(off['peak']) if off else '–'} | "
                         f"{mb(on['peak']) if on else '–'} | – | – | – |")
        for mode in ("off", "on"):
            pts = [(c["latent_px"], c["peak"]) for c in cells if c["family"] == fam and c["mode"] == mode]
            if len(pts) >= 2:
                w = next(c["weights_fp32"] for c in cells if c["family"] == fam)
                a, b = fit(pts)
                fits[(fam, mode)] = {"per_pixel": a, "fixed": b, "points": len(pts), "weights_fp32": w,
                                     "px_range": [min(p[0] for p in pts), max(p[0] for p in pts)],
                                     "16k_fp16": predict_16k(a, b, w)}
    lines += ["", "Lines (least squares through the cells above, fp32 bytes) and the predicted 16K step (16384×8192, "
              f"latent {PX_16K:,} px, batch 1, fp16: per-pixel part halved, fixed part as measured, weights in "
              "fp16):".replace(" px", " px").replace(f"{PX_16K:,}", f"{PX_16K:,}".replace(",", " ")), "",
              "| family | mode | per latent px | fixed | 16K activations | 16K weights | 16K peak | target |",
              "|---|---|---|---|---|---|---|---|"]
    for (fam, mode), f in fits.items():
        p = f["16k_fp16"]
        ok = "within" if p["total"] <= TARGET[fam] else "over"
        lines.append(f"| {FAMILY[fam]} | {'with' if mode == 'on' else 'without'} the mode | "
                     f"{f['per_pixel']:,.0f} B | {mb(f['fixed'])} | {gb(p['activations'])} | {gb(p['weights'])} | "
                     f"{gb(p['total'])} | {ok} {TARGET[fam] / 1e9:.0f} GB |".replace(",", " "))
    table = "\n".join(lines)
    (RESULTS / f"lowmem_{NAME}.md").write_text(table + "\n")
    (RESULTS / f"lowmem_fits_{NAME}.json").write_text(json.dumps({f"{k[0]}-{k[1]}": v for k, v in fits.items()},
                                                             indent=1))
    plot(cells, fits, "peak allocated (GB)" if key == "allocated_peak" else "peak memory growth (GB)")
    return table


def plot(cells, fits, ylabel="peak memory growth (GB)"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, fam in zip(axes, ("sd15", "sdxl")):
        for mode, colour, label in (("off", "tab:red", "without the mode"), ("on", "tab:blue", "with the mode")):
            pts = sorted((c["latent_px"], c["peak"]) for c in cells if c["family"] == fam and c["mode"] == mode)
            if not pts:
                continue
            ax.plot([p[0] / 1e3 for p in pts], [p[1] / 1e9 for p in pts], "o", color=colour, label=label)
            f = fits.get((fam, mode))
            if f:
                xs = [0, max(p[0] for p in pts) * 1.15]
                ax.plot([x / 1e3 for x in xs], [(f["per_pixel"] * x + f["fixed"]) / 1e9 for x in xs], "-",
                        color=colour, alpha=0.6,
                        label=f"{f['per_pixel'] / 1e3:.1f} KB/px + {f['fixed'] / 1e6:.0f} MB")
        ax.set_title(f"{FAMILY[fam]} UNet step, fp32, CPU")
        ax.set_xlabel("latent px × batch (thousands)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"lowmem_{NAME}.png", dpi=110)


def main(argv=None):
    global NAME, CELLS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd15", "sdxl"])
    ap.add_argument("--sizes", nargs="*", default=[])
    ap.add_argument("--modes", nargs="+", default=["off", "on"])
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--ff-chunk-elements", type=int, help="feed-forward chunk size for the cells (see above)")
    ap.add_argument("--attn-chunk-elements", type=int,
                    help="the mode's LinFusion-layer token chunk for the cells (see above)")
    ap.add_argument("--band-elements", type=int,
                    help="the mode's convolution band size for the cells (at 16K the default 16 M elements band "
                         "every first- and second-level ResBlock and upsampler; at these sizes only some)")
    ap.add_argument("--allocated", action="store_true",
                    help="also measure the peak of torch's CPU allocator (step_memory --allocated; the step runs "
                         "under the profiler, so times read high); a set whose cells all have it is reported by it")
    ap.add_argument("--name", default=NAME,
                    help="which set of cells: benchmarks/results/lowmem_cells_<name>.json, reported as "
                         "lowmem_<name>.md / .png and lowmem_fits_<name>.json (default: %(default)s)")
    a = ap.parse_args(argv)
    NAME, CELLS = a.name, RESULTS / f"lowmem_cells_{a.name}.json"
    if a.family and a.sizes:
        python = host_info()["python"]
        for size in a.sizes:
            for mode in a.modes:
                cell = run_cell(python, a.family, size, mode, 1, a.ff_chunk_elements, a.attn_chunk_elements,
                                a.band_elements, a.allocated)
                cell["ff_chunk_elements"] = a.ff_chunk_elements
                cell["attn_chunk_elements"] = a.attn_chunk_elements
                cell["band_elements"] = a.band_elements
                save_cell(cell)
                print(f"{a.family} {size} {mode:3s}: peak +{cell['peak'] / 1e6:8.0f} MB, allocated "
                      f"{(cell['allocated_peak'] or 0) / 1e6:8.0f} MB, parked "
                      f"{cell['parked'] / 1e6:6.0f} MB, {cell['seconds']:.0f} s", flush=True)
    if a.report or not a.sizes:
        print(report())


if __name__ == "__main__":
    main()
