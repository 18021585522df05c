"""Benchmark LinFusion's attention op against softmax attention and the authors' formulation.

SD-1.5 level-0 self-attention shapes (C=320, 8 heads, batch 2), 4K to 1M tokens. Rows:
  softmax     ComfyUI's optimized_attention as ComfyUI picks it (COMFYUI_PATH, or the ComfyUI this
              pack is installed in), else torch's scaled_dot_product_attention
  authors     the authors' formulation (benchmarks/authors_attention.py), the baseline
  reference   linear_attention_reference
  fast        linear_attention_torch_fast
  triton      linear_attention_triton (CUDA only)
Prints markdown tables (time, speed-up over authors-style in this same process, peak extra memory),
the GEMM+memory "floor" at --floor-tokens, and saves a log-log plot under benchmarks/results/.

    python benchmarks/bench_attention.py --device cpu --max-tokens 262144 --time-limit 20
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.authors_attention import authors_style_attention  # noqa: E402
from linfusion_core.attention import (  # noqa: E402
    linear_attention_reference,
    linear_attention_torch_fast,
    linear_attention_triton,
    triton_supports,
)

SIZES = [4096, 16384, 65536, 262144, 1048576]


# ---------------------------------------------------------------------------------------------
# softmax attention: ComfyUI's own if importable


def load_softmax(device: str):
    """(label, fn(q, k, v, heads)) for ComfyUI's optimized_attention, else torch SDPA."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if REPO.parent.name == "custom_nodes":
        candidates.append(REPO.parent.parent)
    for root in candidates:
        if not (root / "comfy").is_dir():
            continue
        sys.path.insert(0, str(root))
        try:
            import comfy.options

            comfy.options.enable_args_parsing(False)
            import comfy.cli_args

            if device == "cpu":
                comfy.cli_args.args.cpu = True  # else model_management probes CUDA on import
            from comfy.ldm.modules import attention as comfy_attention

            fn = comfy_attention.optimized_attention
            return f"ComfyUI optimized_attention ({fn.__name__})", lambda q, k, v, h: fn(q, k, v, h)
        except Exception as e:  # a ComfyUI that does not import here: fall back, say why
            print(f"[bench] ComfyUI at {root} not usable ({type(e).__name__}: {e}); using torch SDPA", file=sys.stderr)
            sys.path.remove(str(root))

    def sdpa(q, k, v, heads):
        B, N, C = q.shape
        d = C // heads
        qh, kh, vh = (x.view(B, -1, heads, d).transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(B, N, C)

    return "torch SDPA (no ComfyUI found)", sdpa


# ---------------------------------------------------------------------------------------------
# measurement


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def trim_heap():
    """Hand memory freed by earlier runs back to the OS (glibc keeps it in its heap otherwise), so
    the next run's RSS growth shows its own allocations."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            trim_heap()
            self.base = self._rss()
            self.max_rss = self.base
            self.stop = threading.Event()

            def sample():
                while not self.stop.is_set():
                    self.max_rss = max(self.max_rss, self._rss())
                    time.sleep(0.0005)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.max_rss = max(self.max_rss, self._rss())
            self.stop.set()
            self.thread.join()
            self.peak = self.max_rss - self.base


def available_memory(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def timed(fn, q, k, v, heads, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn(q, k, v, heads)
    sync(device)
    dt = time.perf_counter() - t0
    del out
    return dt


def first_run(fn, q, k, v, heads, device):
    """Warm-up run, which also measures peak extra memory."""
    gc.collect()
    with PeakMemory(device) as mem:
        dt = timed(fn, q, k, v, heads, device)
    return dt, mem.peak


def floor_at(tokens, B, C, heads, dtype, device, fast_fn, rounds=6):
    """The floor for the op's work: GEMMs of the same FLOPs as its two batched matmuls, plus one
    read of q, k, v and one write of the output (addcmul reads exactly q, k, v and writes a fresh
    tensor, as the op must). Timed round-robin with the fast path itself, best of each, so that a
    busy spell of a shared machine does not skew the ratio."""
    d = C // heads
    flops = 2 * B * heads * d * d * (tokens + tokens)  # phi(k)^T v and phi(q) [kv | kmean]
    s = max(256, round((flops / 2) ** (1 / 3)))
    a = torch.randn(s, s, dtype=dtype, device=device)
    b = torch.randn(s, s, dtype=dtype, device=device)
    reps = max(1, round(flops / (2 * s ** 3)))
    q, k, v = (torch.randn(B, tokens, C, dtype=dtype, device=device) for _ in range(3))
    o = torch.empty_like(q)
    jobs = {
        "gemm": lambda: [a @ b for _ in range(reps)],
        "mem": lambda: torch.addcmul(q, k, v),
        "mem_prealloc": lambda: torch.addcmul(q, k, v, out=o),
        "fast": lambda: fast_fn(q, k, v, heads),
    }
    best = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name, f in jobs.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            dt = time.perf_counter() - t0
            if r:
                best[name] = min(best.get(name, dt), dt)
    gemm = best["gemm"] * flops / (2 * s ** 3 * reps)
    return {"flops": flops, "gemm_s": gemm, "gemm_tflops": flops / gemm / 1e12, "mem_s": best["mem"],
            "mem_prealloc_s": best["mem_prealloc"], "fast_s": best["fast"], "bytes": 4 * q.numel() * q.element_size(),
            "total_s": gemm + best["mem"]}


def fmt_time(s):
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-tokens", type=int, default=SIZES[-1])
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds per config; slower ones are skipped")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--floor-tokens", type=int, default=65536)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device == "cuda" else "fp32")]
    B, C, H = args.batch, args.channels, args.heads
    sizes = [n for n in SIZES if n <= args.max_tokens]

    softmax_label, softmax_fn = load_softmax(device)
    # (key, label, fn, (exponent of time, of memory) in tokens) for the skip estimates. Softmax
    # memory grows linearly after the first size: ComfyUI's backends and SDPA chunk or tile the
    # scores (sub-quadratic / flash / memory-efficient); its first size is checked against a full
    # score matrix.
    impls = [
        ("softmax", softmax_label, softmax_fn, (2, 1)),
        ("authors", "authors-style transcription (baseline)", authors_style_attention, (1, 1)),
        ("reference", "linear_attention_reference", linear_attention_reference, (1, 1)),
        ("fast", "linear_attention_torch_fast", linear_attention_torch_fast, (1, 1)),
    ]
    if device == "cuda":
        probe = torch.empty(1, 1, C, dtype=dtype, device=device)
        if triton_supports(probe, probe, probe, H):
            impls.append(("triton", "linear_attention_triton", linear_attention_triton, (1, 1)))

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# attention benchmark: {device} ({where}), dtype={str(dtype).replace('torch.', '')}, "
          f"B={B}, C={C}, heads={H}, torch {torch.__version__}")
    results = {key: {} for key, *_ in impls}  # key -> tokens -> {"time", "peak"} or {"skip"}
    last = {}  # key -> (tokens, time, peak) of its previous size, or (None, reason, None)
    elem = torch.tensor([], dtype=dtype).element_size()
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(n)
        q, k, v = (torch.empty(B, n, C, dtype=dtype, device=device).uniform_(-2, 2, generator=gen) for _ in range(3))
        io_bytes = B * n * C * elem
        for key, label, fn, expo in impls:
            row = results[key]
            if key in last and last[key][0] is None:
                row[n] = {"skip": last[key][1]}
                continue
            if key in last:
                n0, t0, m0 = last[key]
                est_t, est_m = t0 * (n / n0) ** expo[0], m0 * (n / n0) ** expo[1]
            else:  # first size: no timing yet; memory as if it stored the scores / 8 activations
                est_t = 0.0
                est_m = B * H * n * n * 4 if expo[0] == 2 else 8 * io_bytes
            if est_t > args.time_limit:
                reason = f"skipped (> {args.time_limit:g} s limit, est. {fmt_time(est_t)})"
            elif est_m + io_bytes > 0.8 * available_memory(device):
                reason = f"skipped (est. {est_m / 2**30:.1f} GiB > free memory)"
            else:
                reason = None
            if reason:
                row[n] = {"skip": reason}
                last[key] = (None, reason, None)
                print(f"  {n:>8} {key:<9} {reason}", flush=True)
                continue
            try:
                t, peak = first_run(fn, q, k, v, H, device)
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                reason = f"failed ({type(e).__name__})"
                row[n] = {"skip": reason}
                last[key] = (None, reason, None)
                print(f"  {n:>8} {key:<9} {reason}: {e}", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            row[n] = {"time": t, "peak": peak, "runs": [t]}
            print(f"  {n:>8} {key:<9} first run {fmt_time(t):>10}  peak +{peak / 2**20:.0f} MiB", flush=True)
        # Timed rounds, round-robin over the implementations so that a slow spell of a shared
        # machine hits all of them alike; each keeps its best time. Repeats stop at the limit.
        live = [(key, fn) for key, _, fn, _ in impls if "time" in results[key].get(n, {})]
        for _ in range(args.repeats):
            for key, fn in live:
                r = results[key][n]
                if sum(r["runs"]) + min(r["runs"]) > args.time_limit:
                    continue
                r["runs"].append(timed(fn, q, k, v, H, device))
        for key, fn in live:
            r = results[key][n]
            timed_runs = r["runs"][1:] or r["runs"]  # the first run is a warm-up when there are others
            r["time"] = min(timed_runs)
            last[key] = (n, r["time"], max(r["peak"], 1))
            if r["time"] > args.time_limit:
                last[key] = (None, f"skipped (> {args.time_limit:g} s limit)", None)
            print(f"  {n:>8} {key:<9} best of {len(timed_runs)}: {fmt_time(r['time'])}", flush=True)
        del q, k, v
        gc.collect()

    # tables
    labels = {key: label for key, label, *_ in impls}
    head = "| implementation | " + " | ".join(f"{n:,}" for n in sizes) + " |"
    sep = "|---|" + "---|" * len(sizes)
    print("\n## time (speed-up vs authors-style, same process)\n")
    print(head)
    print(sep)
    for key, *_ in impls:
        cells = []
        for n in sizes:
            r = results[key].get(n, {})
            if "time" not in r:
                cells.append(r.get("skip", "-"))
                continue
            base = results["authors"].get(n, {}).get("time")
            cells.append(fmt_time(r["time"]) + (f" ({base / r['time']:.2f}x)" if base else ""))
        print(f"| {labels[key]} | " + " | ".join(cells) + " |")
    mem_note = "CUDA max_memory_allocated" if device == "cuda" else "sampled RSS, includes the output"
    print(f"\n## peak extra memory, MiB ({mem_note}; inputs q+k+v not counted)\n")
    print(head)
    print(sep)
    for key, *_ in impls:
        cells = [f"{results[key][n]['peak'] / 2**20:.0f}" if "peak" in results[key].get(n, {}) else "-" for n in sizes]
        print(f"| {labels[key]} | " + " | ".join(cells) + " |")

    # floor
    floor = None
    nf = args.floor_tokens
    if nf <= args.max_tokens:
        floor = floor_at(nf, B, C, H, dtype, device, linear_attention_torch_fast)
        total = floor["total_s"]
        print(f"\n## floor at {nf:,} tokens (timed round-robin with the fast path)\n")
        print(f"- GEMM of the same FLOPs ({floor['flops'] / 1e9:.2f} GFLOP at {floor['gemm_tflops']:.2f} TFLOP/s): "
              f"{fmt_time(floor['gemm_s'])}")
        print(f"- read q,k,v + write the output ({floor['bytes'] / 2**20:.0f} MiB, torch.addcmul into a new tensor): "
              f"{fmt_time(floor['mem_s'])} (into a preallocated one: {fmt_time(floor['mem_prealloc_s'])})")
        print(f"- floor (sum of the two): {fmt_time(total)}")
        fast_t = floor["fast_s"]
        print(f"- fast path: {fmt_time(fast_t)} = {fast_t / total:.2f}x floor (target <= 3x)")
        auth_t = results["authors"].get(nf, {}).get("time")
        fast_main = results["fast"].get(nf, {}).get("time")
        if auth_t and fast_main:
            print(f"- fast path vs authors-style (table above): {auth_t / fast_main:.2f}x faster (target >= 8x)")
        tri_t = results.get("triton", {}).get(nf, {}).get("time")
        if tri_t:
            print(f"- triton: {fmt_time(tri_t)} = {tri_t / total:.2f}x floor")

    # save
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_attention_{device}"
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"device": device, "where": where, "dtype": str(dtype), "B": B, "C": C, "heads": H, "labels": labels,
         "results": {k: {str(n): r for n, r in v.items()} for k, v in results.items()}, "floor": floor}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)")
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, *_ in impls:
        pts = [(n, r["time"], r["peak"]) for n, r in sorted(results[key].items()) if "time" in r]
        if not pts:
            continue
        ns, ts, ms = zip(*pts)
        ax_t.plot(ns, [t * 1e3 for t in ts], marker="o", label=labels[key])
        ax_m.plot(ns, [max(m, 2**20) / 2**20 for m in ms], marker="o", label=labels[key])
    for ax, title in ((ax_t, "time (ms)"), (ax_m, f"peak extra memory (MiB, {mem_note})")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"attention, {where}, {str(dtype).replace('torch.', '')}, B={B}, C={C}, heads={H}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=120)
    print(f"\nsaved {out_dir / (stem + '.png')} and {stem}.json")


if __name__ == "__main__":
    main()
