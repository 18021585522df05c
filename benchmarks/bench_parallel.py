"""Exact spatial parallelism (linfusion_core/parallel.py, issue 14): measure it on this CPU and model its speed-up
on GPUs at the 16K stage.

Three sub-commands, each a process of its own (one true-size UNet in memory at a time):

  measure --family sd15   true-size SD-1.5 UNet with LinFusion (generated weights, fp16 storage, fp32 compute on the
                          CPU through ComfyUI's manual cast), batch 2 (cond + uncond), at each --sizes latent:
                            plain       the UNet called whole in this process, 2 threads (the baseline)
                            plain-1t    the same in a forked process with 1 thread (what one rank's core can do)
                            1 rank      linfusion_core.parallel.unet_step in a 1-rank gloo group in this
                                        process, 2 threads (the parallel path's overhead against the plain call;
                                        a forked rank with 2 threads would hang in the parent's OpenMP pool)
                            2 ranks     unet_step on 2 forked gloo ranks (harness/parallel_ranks.run_ranks: fork
                                        shares the weights), 1 thread each, output gathered on rank 0
                          Warm-up first, then --repeats timed steps each; median and min. The 2 ranks share the 2
                          cores: their figure is the parallel path's overhead plus parallel efficiency on shared
                          cores, not a GPU speed-up. Per rank: bytes sent per step by kind and calls (Traffic),
                          checked against traffic_per_step from the geometry; seconds spent inside the collectives.
                          Per top-level block (time_embed, input_blocks[i], middle_block, output_blocks[i], out)
                          the plain step's time from forward hooks, and conv/linear/attention FLOPs from forward
                          hooks; their token-scaling part is fitted over the sizes (t = a + b * tokens).
  measure --family sdxl   the same inventory and FLOPs for SD-XL (plus a plain time at --sizes, and a 2-rank
                          traffic and exactness check at --ranks-sizes), so its 16K step time can be scaled from
                          SD-1.5's.
  report                  combines the two into benchmarks/results/parallel_cpu.json and .md, with the model:
                          per rank T1 * (constant part + token part * largest band) + bytes / bandwidth
                          + calls * latency, at NVLink / PCIe Gen4 / Gen5, no overlap and perfect overlap.

Run (each heavy step under the machine's lock):

    flock /work/heavy.lock .host/venv/bin/python benchmarks/bench_parallel.py measure --family sd15 \\
        --sizes 64x64 128x64 --repeats 3
    flock /work/heavy.lock .host/venv/bin/python benchmarks/bench_parallel.py measure --family sdxl \\
        --sizes 64x64 --flop-sizes 32x32 64x64 --ranks-sizes 32x32 --repeats 2
    .host/venv/bin/python benchmarks/bench_parallel.py report

``--append`` on measure keeps the rows of other sizes already in the family's file (so sizes can run as separate,
shorter jobs).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
BATCH = 2
MACHINE = "2-core CPU VM, fp32"

# ------------------------------------------------------------------------------------------- model assumptions
# The one measured GPU figure: benchmarks/results/gpu_check_NVIDIA-H200.json, LinFusion SD-1.5, 16384x8192 px
# (latent 2048x1024, width x height), fp16, batch 2, Triton attention, one H200, 2026-11-26.
GPU_JSON = RESULTS / "gpu_check_NVIDIA-H200.json"
STAGE_16K = (1024, 2048)   # latent height x width: 16384 px wide x 8192 px high (gpu_check: size [w, h])
LINKS = {  # name: (achieved bytes/s per direction per GPU, latency per call in s)
    "NVLink 4 (H100/H200 SXM, 450 GB/s/dir peak)": (350e9, 20e-6),
    "PCIe Gen5 x16": (50e9, 50e-6),
    "PCIe Gen4 x16": (25e9, 50e-6),
}
WIDTHS_PX = (4096, 8192, 16384, 32768)


def parse_size(s: str) -> tuple[int, int]:
    h, w = (int(v) for v in s.lower().split("x"))
    return h, w


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "all": list(xs)}


# ============================================================================================ measure

def _setup():
    from harness.host import host_info
    info = host_info()
    if info.get("fixtures"):
        os.environ.setdefault("LINFUSION_FIXTURES_DIR", info["fixtures"])
    sys.path.insert(0, info["comfyui"])
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management  # noqa: F401
    from harness.host import import_pack
    return info, import_pack("LinFusionBench")


def _model(pack, family, tmp):
    """As tests/test_parallel.py builds it: the fixture UNet (fp16 storage, fp32 compute on the CPU), LinFusion
    applied by the pack's own Apply LinFusion code."""
    import torch
    import comfy.model_management as mm
    from harness import fixtures, linfusion_fixtures
    m = fixtures.load_unet(family, {"dtype": torch.float16})
    path = linfusion_fixtures.write(family, Path(tmp) / f"{family}.safetensors", layout="file", seed=5,
                                    projections=family == "sd15")
    ck = pack.linfusion_core.checkpoint.load_checkpoint(path)
    patched = pack.nodes.patching.apply_linfusion(m, ck, 0)
    mm.load_models_gpu([patched])
    return patched


def _inputs(family, h, w, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, h, w, generator=g)
    t = torch.tensor([500.0, 20.0][:BATCH])
    if family == "sdxl":
        return x, t, torch.randn(BATCH, 77, 2048, generator=g), torch.randn(BATCH, 2816, generator=g)
    return x, t, torch.randn(BATCH, 77, 768, generator=g), None


def _level(size_fn, levels, h):
    for lvl in range(levels + 1):
        if size_fn(lvl)[0] == h:
            return lvl
    return None


class Inventory:
    """Forward hooks on the plain step: every spatial conv's input (channels, width, halo rows, level), every
    LinFusion layer's (heads, head size), FLOPs by top-level block, and the time of each top-level block."""

    def __init__(self, unet, bands, flops=True, times=True):
        import torch
        from comfy.ldm.modules.attention import CrossAttention
        self.unet, self.bands = unet, bands
        self.convs, self.states, self.norms = [], [], 0
        self.flops = {}      # block -> FLOPs
        self.times = {}      # block -> seconds
        self.block_level = {}
        self._cur = None
        self._hooks = []
        lin_types = (torch.nn.Linear,)
        # ComfyUI's UNet runs a TimestepEmbedSequential through forward_timestep_embed, which calls its layers
        # one by one (never the block's own __call__): those blocks are hooked on their layers.
        from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential
        hooked = []
        for n, m in self.blocks():
            if isinstance(m, TimestepEmbedSequential):
                hooked += [(n, child) for child in m]
            else:
                hooked.append((n, m))
        names = {id(m): n for n, m in hooked}

        def size_fn(lvl):
            return bands.size(lvl)

        def pre_block(mod, args):
            name = names[id(mod)]
            self._cur = name
            x = args[0] if args else None
            if x is not None and x.dim() == 4 and name not in self.block_level:
                self.block_level[name] = _level(size_fn, bands.levels, x.shape[-2])
            self._t0 = time.perf_counter()

        def post_block(mod, args, out):
            name = names[id(mod)]
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._t0
            self._cur = None

        for n, m in hooked:
            if times or flops:
                self._hooks.append(m.register_forward_pre_hook(pre_block))
                self._hooks.append(m.register_forward_hook(post_block))

        def add(f):
            k = self._cur or "other"
            self.flops[k] = self.flops.get(k, 0) + f

        for name, m in unet.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                if m.kernel_size[0] > 1:
                    def conv_pre(mod, a):
                        x = a[0]
                        self.convs.append((_level(size_fn, bands.levels, x.shape[-2]), x.shape[1], x.shape[-1],
                                           mod.padding[0]))
                    self._hooks.append(m.register_forward_pre_hook(conv_pre))
                if flops:
                    def conv_post(mod, a, out):
                        kh, kw = mod.kernel_size
                        add(2 * (mod.in_channels // mod.groups) * kh * kw * out.numel())
                    self._hooks.append(m.register_forward_hook(conv_post))
            elif isinstance(m, lin_types) and flops:
                def lin_post(mod, a, out):
                    add(2 * mod.in_features * out.numel())
                self._hooks.append(m.register_forward_hook(lin_post))
            elif isinstance(m, torch.nn.GroupNorm):
                def gn_pre(mod, a):
                    self.norms += 1
                self._hooks.append(m.register_forward_pre_hook(gn_pre))
            elif type(m).__name__ == "LinFusionAttention":
                def lf_pre(mod, a, kw):
                    x = a[0]
                    self.states.append((mod.heads, mod.dim_head))
                    if flops:  # phi(k)^T [v|1] and phi(q) . state: 2 x 2 B N H d (d+1)
                        add(4 * x.shape[0] * x.shape[1] * mod.heads * mod.dim_head * (mod.dim_head + 1))
                self._hooks.append(m.register_forward_pre_hook(lf_pre, with_kwargs=True))
            elif isinstance(m, CrossAttention) and flops:
                def ca_pre(mod, a, kw):
                    x = a[0]
                    ctx = kw.get("context", a[1] if len(a) > 1 else None)
                    mk = x.shape[1] if ctx is None else ctx.shape[1]
                    add(4 * x.shape[0] * x.shape[1] * mk * mod.heads * mod.dim_head)  # q k^T and p v
                self._hooks.append(m.register_forward_pre_hook(ca_pre, with_kwargs=True))

    def blocks(self):
        u = self.unet
        out = [("time_embed", u.time_embed)]
        if getattr(u, "label_emb", None) is not None:
            out.append(("label_emb", u.label_emb))
        out += [(f"input_blocks.{i}", b) for i, b in enumerate(u.input_blocks)]
        out.append(("middle_block", u.middle_block))
        out += [(f"output_blocks.{i}", b) for i, b in enumerate(u.output_blocks)]
        out.append(("out", u.out))
        return out

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _plain_step(unet, inp):
    import torch
    x, t, c, y = inp
    with torch.no_grad():
        t0 = time.perf_counter()
        out = unet(x, t, c, y, None, {})
        return out, time.perf_counter() - t0


def _wrap_comm(par):
    """Seconds spent inside the collectives (including waiting for the other ranks), by kind; installed in a
    forked rank only."""
    spent = {}

    def wrap(name, kind_of):
        orig = getattr(par.Comm, name)

        def f(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return orig(self, *a, **k)
            finally:
                kind = kind_of(a, k)
                spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - t0
        setattr(par.Comm, name, f)

    wrap("halo", lambda a, k: "halo")
    wrap("all_reduce", lambda a, k: a[1] if len(a) > 1 else k.get("kind", "all_reduce"))
    wrap("all_gather_rows", lambda a, k: "all_gather")
    wrap("gather_rows", lambda a, k: "gather")
    return spent


def _time_ranks(par, unet, inp, ranks, threads, repeats, warmup=1):
    import torch
    import torch.distributed as dist
    from harness.parallel_ranks import run_ranks
    x, t, c, y = inp
    bands = par.split_bands(x.shape[-2], x.shape[-1], ranks, par.unet_align(unet))

    def rank_fn(rank, world):
        spent = _wrap_comm(par)
        traffic = par.Traffic()
        times, comm = [], []
        out = None
        for i in range(warmup + repeats):
            traffic.reset()
            spent.clear()
            dist.barrier()
            t0 = time.perf_counter()
            out = par.unet_step(unet, x, t, c, bands=bands, y=y, traffic=traffic, gather=True)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
                comm.append(dict(spent))
        return {"times": times, "comm_s": comm, "traffic": traffic.as_dict(), "threads": torch.get_num_threads(),
                "out": out}

    if ranks == 1:
        # One rank runs in this process (a gloo group of one): a forked child with more than one intra-op thread
        # hangs in the OpenMP pool the parent already started, so only single-threaded ranks are forked.
        from datetime import timedelta
        from harness.parallel_ranks import free_port
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=timedelta(seconds=600))
        orig = {k: getattr(par.Comm, k) for k in ("halo", "all_reduce", "all_gather_rows", "gather_rows")}
        try:
            with torch.no_grad():
                res = [rank_fn(0, 1)]
        finally:
            for k, v in orig.items():
                setattr(par.Comm, k, v)
            dist.destroy_process_group()
        return bands, res
    if threads != 1:
        raise ValueError("forked ranks run one thread each (see above)")
    res = run_ranks(rank_fn, ranks, timeout=3000, threads=threads)
    return bands, res


def _time_plain_forked(unet, inp, threads, repeats, warmup=1):
    import torch
    from harness.parallel_ranks import run_ranks

    def fn(rank, world):
        ts = []
        for i in range(warmup + repeats):
            _, dt = _plain_step(unet, inp)
            if i >= warmup:
                ts.append(dt)
        return {"times": ts, "threads": torch.get_num_threads()}

    return run_ranks(fn, 1, timeout=3000, threads=threads)[0]


def _err(got, want):
    return float(((got.float() - want.float()).abs().max() / want.float().abs().max()).item())


def _check_traffic(par, bands, inv_convs, states, traffic_by_rank):
    """Measured Traffic per rank against traffic_per_step (fp32 on the CPU) from the geometry."""
    convs = [(lvl, c, p) for lvl, c, w, p in inv_convs]
    rows = []
    for r, tr in enumerate(traffic_by_rank):
        formula = par.traffic_per_step(bands, BATCH, convs, states, bytes_per_element=4, rank=r)
        halo_only = par.traffic_per_step(bands, BATCH, convs, [], bytes_per_element=4, rank=r)
        measured = tr["bytes"].get("halo", 0) + tr["bytes"].get("linfusion_state", 0)
        rows.append({"rank": r, "measured_halo_plus_state": measured, "formula": formula,
                     "halo_measured": tr["bytes"].get("halo", 0), "halo_formula": halo_only,
                     "state_measured": tr["bytes"].get("linfusion_state", 0), "state_formula": formula - halo_only,
                     "halo_equal": tr["bytes"].get("halo", 0) == halo_only,
                     # the formula sums the states in float and rounds once; Traffic rounds each call
                     "state_equal_to_rounding": abs(tr["bytes"].get("linfusion_state", 0) - (formula - halo_only))
                     <= len(states),
                     "bytes": tr["bytes"], "calls": tr["calls"], "total": tr["total"]})
    return rows


def measure(a):
    info, pack = _setup()
    import importlib
    import torch
    torch.set_num_threads(a.threads)
    par = importlib.import_module(f"{pack.__name__}.linfusion_core.parallel")
    out_path = RESULTS / f"parallel_cpu_{a.family}.json"
    doc = json.loads(out_path.read_text()) if a.append and out_path.exists() else {}
    doc.update({"family": a.family, "date": datetime.date.today().isoformat(), "machine": MACHINE,
                "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "torch": torch.__version__, "batch": BATCH, "threads_plain": a.threads,
                "command": "benchmarks/bench_parallel.py " + " ".join(sys.argv[1:])})
    doc.setdefault("sizes", {})
    doc.setdefault("inventory", {})
    t_load = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        patched = _model(pack, a.family, tmp)
    unet = patched.model.diffusion_model
    doc["storage_dtype"] = str(patched.model.get_dtype()).replace("torch.", "")
    doc["compute_dtype"] = str(patched.model.manual_cast_dtype).replace("torch.", "")
    doc["align"] = par.unet_align(unet)
    doc["load_s"] = time.perf_counter() - t_load
    print(f"[{a.family}] loaded in {doc['load_s']:.0f}s; align {doc['align']}", flush=True)

    # inventory + FLOPs at each FLOP size (one plain step each; it is also the warm-up)
    for s in sorted(set(a.flop_sizes + a.sizes), key=lambda s: parse_size(s)[0] * parse_size(s)[1]):
        h, w = parse_size(s)
        inp = _inputs(a.family, h, w)
        bands1 = par.split_bands(h, w, 1, doc["align"])
        inv = Inventory(unet, bands1, flops=True, times=False)
        try:
            _, dt = _plain_step(unet, inp)
        finally:
            inv.remove()
        doc["inventory"][s] = {"tokens": h * w, "convs": inv.convs, "states": inv.states, "groupnorms": inv.norms,
                               "flops_by_block": inv.flops, "block_level": inv.block_level,
                               "flops_total": sum(inv.flops.values()), "step_s_with_hooks": dt}
        print(f"[{a.family}] {s}: {len(inv.convs)} spatial convs, {len(inv.states)} LinFusion layers, "
              f"{inv.norms} GroupNorms, {sum(inv.flops.values()) / 1e9:.1f} GFLOP, step {dt:.2f}s (hooked, warm-up)",
              flush=True)

    for s in a.sizes:
        h, w = parse_size(s)
        inp = _inputs(a.family, h, w)
        row = {"latent": [h, w], "tokens": h * w}
        # plain, this process, a.threads threads, with block-time hooks (a few perf_counter calls a block)
        inv = Inventory(unet, par.split_bands(h, w, 1, doc["align"]), flops=False, times=True)
        plain_t, blocks = [], []
        try:
            for i in range(a.repeats):
                inv.times.clear()
                want, dt = _plain_step(unet, inp)
                plain_t.append(dt)
                blocks.append(dict(inv.times))
        finally:
            inv.remove()
        row["plain"] = stats(plain_t)
        row["plain_blocks"] = {k: statistics.median(b.get(k, 0.0) for b in blocks) for k in blocks[0]}
        row["block_level"] = inv.block_level
        print(f"[{a.family}] {s} plain ({a.threads} threads): median {row['plain']['median']:.2f}s "
              f"min {row['plain']['min']:.2f}s", flush=True)
        if "plain1" in a.configs:
            r = _time_plain_forked(unet, inp, 1, a.repeats)
            row["plain_1thread"] = stats(r["times"])
            print(f"[{a.family}] {s} plain (1 thread, forked): median {row['plain_1thread']['median']:.2f}s",
                  flush=True)
        for ranks, threads, key in ((1, a.threads, "rank1"), (2, 1, "rank2")):
            if key not in a.configs:
                continue
            bands, res = _time_ranks(par, unet, inp, ranks, threads, a.repeats)
            step = [max(r["times"][i] for r in res) for i in range(a.repeats)]
            comm = [{k: max(r["comm_s"][i].get(k, 0.0) for r in res) for k in res[0]["comm_s"][i]}
                    for i in range(a.repeats)]
            entry = {"ranks": ranks, "threads_per_rank": threads, "bands": list(bands.starts),
                     "step": stats(step), "per_rank_times": [r["times"] for r in res],
                     "comm_s_median": {k: statistics.median(c[k] for c in comm) for k in comm[0]},
                     "err_vs_plain": _err(res[0]["out"], want),
                     "traffic": _check_traffic(par, bands, doc["inventory"][s]["convs"],
                                               doc["inventory"][s]["states"], [r["traffic"] for r in res])}
            row[key] = entry
            print(f"[{a.family}] {s} {ranks} rank(s) x {threads} thread(s): median {entry['step']['median']:.2f}s "
                  f"min {entry['step']['min']:.2f}s (plain {row['plain']['median']:.2f}s), in collectives "
                  f"{sum(entry['comm_s_median'].values()):.2f}s, err {entry['err_vs_plain']:.1e}, bytes/rank "
                  f"{[t['total'] for t in entry['traffic']]}, formula equal "
                  f"{[t['halo_equal'] and t['state_equal_to_rounding'] for t in entry['traffic']]}", flush=True)
            del res
            gc.collect()
        doc["sizes"][s] = row
        out_path.write_text(json.dumps(doc, indent=1))

    for s in a.ranks_sizes:  # 2 ranks once: exactness and the traffic check only (SD-XL)
        h, w = parse_size(s)
        inp = _inputs(a.family, h, w)
        bands1 = par.split_bands(h, w, 1, doc["align"])
        inv = Inventory(unet, bands1, flops=False, times=False)
        try:
            want, dt = _plain_step(unet, inp)
        finally:
            inv.remove()
        bands, res = _time_ranks(par, unet, inp, 2, 1, 1, warmup=0)
        entry = {"latent": [h, w], "bands": list(bands.starts), "plain_s": dt,
                 "step_s_1rep": max(r["times"][0] for r in res), "err_vs_plain": _err(res[0]["out"], want),
                 "traffic": _check_traffic(par, bands, inv.convs, inv.states, [r["traffic"] for r in res])}
        doc.setdefault("ranks_check", {})[s] = entry
        print(f"[{a.family}] {s} 2-rank check: err {entry['err_vs_plain']:.1e}, bytes/rank "
              f"{[t['total'] for t in entry['traffic']]}, formula equal "
              f"{[t['halo_equal'] and t['state_equal_to_rounding'] for t in entry['traffic']]}", flush=True)
        out_path.write_text(json.dumps(doc, indent=1))
    out_path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out_path}")


# ============================================================================================ the model

def _split_bands(height, width, ranks, align):
    units = -(-height // align)
    base, extra = divmod(units, ranks)
    starts = [0]
    for r in range(ranks):
        starts.append(min(height, starts[-1] + (base + (r >= ranks - extra)) * align))
    return starts


def _size(h, w, lvl):
    f = 1 << lvl
    return -(-h // f), -(-w // f)


def _traffic_formula(h, w, ranks, rank, convs, states, bpe):
    """traffic_per_step (linfusion_core.parallel) restated for the report, which imports no torch: halo rows to
    each neighbour at every spatial conv, ring all-reduce of each LinFusion state (fp32)."""
    neighbours = (rank > 0) + (rank < ranks - 1)
    halo = sum(neighbours * p * _size(h, w, lvl)[1] * c * BATCH * bpe for lvl, c, p in convs)
    state = sum(2 * (ranks - 1) / ranks * BATCH * hh * d * (d + 1) * 4 for hh, d in states)
    return halo, state


def _fit(points):
    """(a, b) of y = a + b x through two or more points (least squares)."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0, my / mx
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - b * mx, b


def _fmt_bytes(b):
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= f:
            return f"{b / f:.2f} {unit}"
    return f"{b:.0f} B"


def model_family(doc, t1, stage=STAGE_16K):
    """The speed-up model of one family at the 16K stage."""
    H, W = stage
    inv_sizes = sorted(doc["inventory"], key=lambda s: doc["inventory"][s]["tokens"])
    inv = doc["inventory"][inv_sizes[-1]]
    convs = [(lvl, c, p) for lvl, c, w, p in inv["convs"]]
    states = [tuple(s) for s in inv["states"]]
    n_gn = inv["groupnorms"]
    # FLOPs: constant part and token part (exact for latents divisible by the alignment)
    a, b = _fit([(doc["inventory"][s]["tokens"], doc["inventory"][s]["flops_total"]) for s in inv_sizes])
    flops_16k = a + b * H * W
    const_frac = a / flops_16k
    align = doc["align"]
    out = {"T1_s": t1, "flops_16k": flops_16k, "flops_const": a, "flops_per_token": b, "const_frac": const_frac,
           "spatial_convs": len(convs), "linfusion_layers": len(states), "groupnorms": n_gn, "align": align,
           "rows": []}
    for n in (2, 4, 8):
        starts = _split_bands(H, W, n, align)
        rows_max = max(e - s for s, e in zip(starts, starts[1:]))
        f_max = rows_max / H
        compute = t1 * (const_frac + (1 - const_frac) * f_max)
        worst = 1 if n > 2 else 0   # an interior rank has two neighbours
        halo, state = _traffic_formula(H, W, n, worst, convs, states, 2)
        gn = n_gn * 2 * (n - 1) / n * 3 * 32 * BATCH * 8
        gather = BATCH * 4 * rows_max * W * 2   # each rank's output band (fp16) to rank 0, if gathered every step
        calls = len(convs) + n_gn + len(states)
        for link, (bw, lat) in LINKS.items():
            for gathered in (False, True):
                nbytes = halo + state + gn + (gather if gathered else 0)
                ncalls = calls + (1 if gathered else 0)
                comm = nbytes / bw + ncalls * lat
                out["rows"].append({
                    "n": n, "link": link, "bandwidth": bw, "latency": lat, "gather_each_step": gathered,
                    "bands": starts, "largest_band_frac": f_max, "compute_s": compute,
                    "bytes": {"halo": halo, "linfusion_state": state, "groupnorm": gn,
                              "gather": gather if gathered else 0, "total": nbytes},
                    "calls": ncalls, "comm_s": comm, "comm_bytes_s": nbytes / bw, "comm_latency_s": ncalls * lat,
                    "speedup_serial": t1 / (compute + comm), "speedup_overlap": t1 / max(compute, comm),
                    "efficiency_serial": t1 / (compute + comm) / n})
    # bytes per rank against the image width (interior rank, batch 2, fp16 activations, fp32 states)
    per_col = sum(2 * p * c * BATCH * 2 / (1 << lvl) for lvl, c, p in convs)   # x latent width (widths % 2**lvl == 0)
    out["halo_bytes_per_latent_column"] = per_col
    out["state_bytes_ring_n2"] = _traffic_formula(8, 8, 2, 0, [], states, 2)[1]
    out["by_width"] = []
    for px in WIDTHS_PX:
        wl = px // 8
        row = {"width_px": px, "latent_width": wl}
        for n in (2, 8):
            halo, state = _traffic_formula(H, wl, n, 1 if n > 2 else 0, convs, states, 2)
            row[f"n{n}"] = {"halo": halo, "state": state, "groupnorm": n_gn * 2 * (n - 1) / n * 3 * 32 * BATCH * 8}
        out["by_width"].append(row)
    return out


def block_profile(doc):
    """Per top-level block and per level: measured plain-step seconds at each size, the fitted token-scaling part,
    and FLOP shares."""
    sizes = sorted(doc["sizes"], key=lambda s: doc["sizes"][s]["tokens"])
    if not sizes:
        return None
    levels = doc["sizes"][sizes[0]]["block_level"]
    names = list(doc["sizes"][sizes[0]]["plain_blocks"])
    inv_sizes = sorted(doc["inventory"], key=lambda s: doc["inventory"][s]["tokens"])
    blocks = []
    for nm in names:
        pts = [(doc["sizes"][s]["tokens"], doc["sizes"][s]["plain_blocks"].get(nm, 0.0)) for s in sizes]
        a, b = _fit(pts) if len(pts) > 1 else (0.0, pts[0][1] / pts[0][0])
        fpts = [(doc["inventory"][s]["tokens"], doc["inventory"][s]["flops_by_block"].get(nm, 0)) for s in inv_sizes]
        fa, fb = _fit(fpts) if len(fpts) > 1 else (0.0, fpts[0][1] / fpts[0][0])
        blocks.append({"block": nm, "level": levels.get(nm), "seconds": {s: doc["sizes"][s]["plain_blocks"].get(nm, 0.0)
                                                                          for s in sizes},
                       "const_s": a, "s_per_token": b, "flops_const": fa, "flops_per_token": fb})
    by_level = {}
    for bl in blocks:
        key = "emb" if bl["level"] is None else f"L{bl['level']}"
        d = by_level.setdefault(key, {"blocks": [], "seconds": {s: 0.0 for s in sizes}, "s_per_token": 0.0,
                                      "const_s": 0.0, "flops_per_token": 0.0})
        d["blocks"].append(bl["block"])
        for s in sizes:
            d["seconds"][s] += bl["seconds"][s]
        d["s_per_token"] += bl["s_per_token"]
        d["const_s"] += bl["const_s"]
        d["flops_per_token"] += bl["flops_per_token"]
    tot_b = sum(d["s_per_token"] for d in by_level.values()) or 1.0
    tot_f = sum(d["flops_per_token"] for d in by_level.values()) or 1.0
    unhooked = {}
    for s in sizes:
        tot = doc["sizes"][s]["plain"]["median"]
        hooked = sum(d["seconds"][s] for d in by_level.values())
        for d in by_level.values():
            d.setdefault("frac", {})[s] = d["seconds"][s] / hooked
        unhooked[s] = tot - hooked
    by_level["_unhooked"] = unhooked
    for k, d in by_level.items():
        if k.startswith("_"):
            continue
        d["token_part_frac"] = d["s_per_token"] / tot_b
        d["flop_token_frac"] = d["flops_per_token"] / tot_f
    return {"blocks": blocks, "by_level": by_level, "sizes": sizes}


def report(a):
    docs = {}
    for fam in ("sd15", "sdxl"):
        p = RESULTS / f"parallel_cpu_{fam}.json"
        if p.exists():
            docs[fam] = json.loads(p.read_text())
    if "sd15" not in docs:
        raise SystemExit("run `measure --family sd15` first")
    gpu = json.loads(GPU_JSON.read_text())
    row16 = next(r for r in gpu["sections"]["unet"]["rows"]
                 if r["latent"] == [STAGE_16K[1], STAGE_16K[0]] and r["config"] == "linfusion")
    t1_sd15 = row16["seconds"]
    result = {"date": datetime.date.today().isoformat(), "machine": MACHINE,
              "commands": [d["command"] for d in docs.values()] + ["benchmarks/bench_parallel.py report"],
              "measured": docs, "assumptions": {}, "model": {}, "profile": {}}
    sd15 = docs["sd15"]
    m15 = model_family(sd15, t1_sd15)
    result["model"]["sd15"] = m15
    result["assumptions"]["T1_sd15"] = (f"{t1_sd15:.3f} s: measured, LinFusion SD-1.5 16384x8192 fp16 batch 2 on one "
                                        f"{gpu['device']} ({gpu['date'][:10]}, {GPU_JSON.name}), Triton attention")
    if "sdxl" in docs:
        mx = model_family(docs["sdxl"], 1.0)
        ratio = mx["flops_16k"] / m15["flops_16k"]
        cpu_ratio = None
        common = [s for s in docs["sdxl"].get("sizes", {}) if s in sd15.get("sizes", {})]
        if common:
            s = common[0]
            cpu_ratio = docs["sdxl"]["sizes"][s]["plain"]["median"] / sd15["sizes"][s]["plain"]["median"]
        t1_xl = t1_sd15 * ratio
        result["model"]["sdxl"] = model_family(docs["sdxl"], t1_xl)
        result["model"]["sdxl"]["flop_ratio_to_sd15"] = ratio
        result["model"]["sdxl"]["cpu_time_ratio_to_sd15"] = cpu_ratio
        result["model"]["sdxl"]["cpu_time_ratio_size"] = common[0] if common else None
        result["assumptions"]["T1_sdxl"] = (
            f"{t1_xl:.2f} s: MODEL, no GPU figure. SD-1.5's measured {t1_sd15:.2f} s x the FLOP ratio SD-XL/SD-1.5 "
            f"at the 16K latent ({ratio:.2f}; conv, linear and attention-core FLOPs counted with forward hooks at "
            f"small latents and extrapolated linearly, exact for latents divisible by the alignment)"
            + (f"; the CPU time ratio at latent {common[0]} is {cpu_ratio:.2f}" if cpu_ratio else ""))
    result["assumptions"]["links"] = {k: {"bytes_per_s": v[0], "latency_s": v[1]} for k, v in LINKS.items()}
    result["assumptions"]["notes"] = [
        "compute per rank = T1 x (constant part + token part x largest band / height); the constant part (time "
        "and label embeddings, cross-attention k/v of the 77 context tokens) runs on every rank; its share is the "
        "FLOP share at the 16K latent",
        "bands: split_bands(1024, 2048, n, 2**levels) (1024 latent rows, 2048 columns): 1024 rows are a whole "
        "number of aligned units for n = 2, 4, 8, so every band has 1024/n rows at every level (no remainder); a remainder would go to the last bands "
        "as whole units of 2**levels rows, and the largest band sets the step time",
        "bytes per rank: an interior rank (two neighbours; n = 2: one), halo activations fp16, LinFusion states "
        "fp32 (ring all-reduce 2(n-1)/n), GroupNorm statistics fp64 (3 x 32 a sample and norm, ring)",
        "calls per step = spatial convs (one halo exchange each) + GroupNorms + LinFusion layers (+1 gather); "
        "each call costs the link's latency",
        "serial: T1 / (compute + bytes/bandwidth + calls x latency); overlap: T1 / max(compute, comm), for "
        "reference only (every halo and all-reduce sits on the critical path of the next op as the code runs)",
        "not modelled: load imbalance between GPUs beyond the band sizes, the parallel path's own attention "
        "(linear_attention_state/apply, torch einsum in fp32 chunks) against the single-GPU Triton kernel, "
        "kernel efficiency at 1/n of the tokens (still >= 262,144 latent tokens a rank at n = 8)",
    ]
    for fam, d in docs.items():
        result["profile"][fam] = block_profile(d) if d.get("sizes") else None
    (RESULTS / "parallel_cpu.json").write_text(json.dumps(result, indent=1))
    md = render_md(result)
    (RESULTS / "parallel_cpu.md").write_text(md)
    print(md)
    print(f"wrote {RESULTS / 'parallel_cpu.json'} and .md")


# ============================================================================================ markdown

def _ms(s):
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def render_md(r) -> str:
    L = []
    sd15 = r["measured"]["sd15"]
    L += [f"# Exact spatial parallelism: measured on a CPU, modelled on GPUs ({r['date']})", "",
          f"Machine: **{r['machine']}** ({sd15['cpu']}, {sd15['cores']} cores, torch {sd15['torch']}). "
          f"Script: `benchmarks/bench_parallel.py`. Commands:", ""]
    L += ["```"] + [f"flock /work/heavy.lock .host/venv/bin/python {c}" if "report" not in c
                    else f".host/venv/bin/python {c}" for c in r["commands"]] + ["```", ""]
    L += ["## Measured: one SD-1.5 UNet step on the CPU (MEASURED)", "",
          f"True-size SD-1.5 UNet with LinFusion (generated weights, {sd15['storage_dtype']} storage, "
          f"{sd15['compute_dtype']} compute), batch {BATCH}. Median (min) of the timed steps after a warm-up; "
          "ratios are against the plain call with 2 threads in the same run. The 2 ranks share the machine's 2 "
          "cores (1 thread each): their figure is overhead plus parallel efficiency on shared cores, not a GPU "
          "speed-up. Efficiency = (plain 1 thread / 2) / 2 ranks.", "",
          "| latent | plain, 2 threads | plain, 1 thread | 1 rank (unet_step), 2 threads | 2 ranks x 1 thread "
          "| 1 rank / plain | 2 ranks / plain | 2-rank efficiency | time in collectives (2 ranks) | max rel err |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for s, row in sd15["sizes"].items():
        p = row["plain"]["median"]
        p1 = row.get("plain_1thread", {}).get("median")
        r1 = row.get("rank1", {}).get("step", {})
        r2 = row.get("rank2", {}).get("step", {})
        eff = f"{(p1 / 2) / r2['median']:.2f}" if p1 and r2 else "–"
        comm = sum(row["rank2"]["comm_s_median"].values()) if "rank2" in row else None

        def cell(st):
            return f"{st['median']:.2f} s ({st['min']:.2f})" if st else "–"

        def ratio(st):
            return f"{st['median'] / p:.2f}x" if st else "–"
        err = row.get("rank2", {}).get("err_vs_plain")
        L.append(f"| {s} | {cell(row['plain'])} | {'–' if not p1 else f'{p1:.2f} s'} | {cell(r1)} | {cell(r2)} | "
                 f"{ratio(r1)} | {ratio(r2)} | {eff} | {'–' if comm is None else f'{comm:.2f} s'} | "
                 f"{'–' if err is None else f'{err:.1e}'} |")
    L += ["", "Time in collectives: seconds a rank spent inside halo exchanges, all-reduces and the final gather "
          "(wall time, so it includes waiting for the other rank), the larger of the two ranks, median.", ""]
    # traffic
    L += ["### Bytes per step per rank (MEASURED, Traffic) against traffic_per_step (geometry)", "",
          "| family | latent | ranks | rank | halo | LinFusion states | GroupNorm stats | gather | calls "
          "(halo / GN / state / gather) | halo + states = formula? |", "|---|---|---|---|---|---|---|---|---|---|"]
    for fam, d in r["measured"].items():
        entries = [(s, row["rank2"]) for s, row in d.get("sizes", {}).items() if "rank2" in row]
        entries += [(s, e) for s, e in d.get("ranks_check", {}).items()]
        for s, e in entries:
            for t in e["traffic"]:
                b, c = t["bytes"], t["calls"]
                L.append(f"| {fam} | {s} | 2 | {t['rank']} | {b.get('halo', 0):,} | {b.get('linfusion_state', 0):,} | "
                         f"{b.get('groupnorm', 0):,} | {b.get('gather', 0):,} | {c.get('halo', 0)} / "
                         f"{c.get('groupnorm', 0)} / {c.get('linfusion_state', 0)} / {c.get('gather', 0)} | "
                         f"{'yes' if t['halo_equal'] and t['state_equal_to_rounding'] else 'NO'} "
                         f"({t['measured_halo_plus_state']:,} vs {t['formula']:,}) |")
    L += ["", "fp32 activations on the CPU (4 bytes an element). The formula (`traffic_per_step`) counts halo rows and "
          "the LinFusion states; GroupNorm statistics and the final gather are outside it. The state bytes may "
          "differ by under one byte a layer (the formula rounds once, Traffic each call).", ""]
    # profile
    L += ["## Per-level compute profile of the plain step (MEASURED on the CPU; FLOPs counted)", ""]
    for fam, prof in r["profile"].items():
        if not prof:
            continue
        sizes = prof["sizes"]
        L += [f"**{fam}**, plain step, 2 threads, batch {BATCH}; seconds per top-level block from forward hooks, "
              "grouped by the UNet level of the block's input (L0 = latent, Lk = latent / 2^k); token part = the "
              "slope of a line through the sizes (time = a + b x tokens), as a share of all slopes; FLOP share = "
              "share of the per-token FLOPs (conv, linear, attention cores).", "",
              "| level | blocks | " + " | ".join(f"{s}: s (share)" for s in sizes) +
              " | token-part share (time) | per-token FLOP share |", "|---|---|" + "---|" * len(sizes) + "---|---|"]
        for k in sorted((k for k in prof["by_level"] if not k.startswith("_")), key=lambda k: (k != "emb", k)):
            d = prof["by_level"][k]
            blocks = ", ".join(b.replace("input_blocks.", "in").replace("output_blocks.", "out")
                               .replace("middle_block", "mid").replace("time_embed", "temb")
                               .replace("label_emb", "lemb") for b in d["blocks"])
            L.append(f"| {k} | {blocks} | " + " | ".join(f"{d['seconds'][s]:.2f} ({d['frac'][s]:.1%})" for s in sizes)
                     + f" | {d['token_part_frac']:.1%} | {d['flop_token_frac']:.1%} |")
        L.append("")
    # SD-XL measured
    if "sdxl" in r["measured"]:
        dx = r["measured"]["sdxl"]
        L += ["### SD-XL on the CPU (MEASURED)", ""]
        for s, row in dx.get("sizes", {}).items():
            L.append(f"- plain step at latent {s}, batch {BATCH}, 2 threads: {row['plain']['median']:.2f} s "
                     f"(min {row['plain']['min']:.2f}); SD-1.5 at the same latent: "
                     f"{sd15['sizes'].get(s, {}).get('plain', {}).get('median', float('nan')):.2f} s")
        for s, e in dx.get("ranks_check", {}).items():
            L.append(f"- 2 ranks at latent {s}: max rel err against the plain step {e['err_vs_plain']:.1e}; "
                     f"bytes per rank equal to the formula: "
                     f"{all(t['halo_equal'] and t['state_equal_to_rounding'] for t in e['traffic'])}")
        L.append("")
    # model
    L += ["## Model: speed-up at the 16K stage on n GPUs (MODEL, not measured)", "",
          f"Latent {STAGE_16K[1]} wide x {STAGE_16K[0]} high (16384x8192 px, width x height), batch {BATCH} "
          "(cond + uncond), fp16; bands are horizontal (rows), so a band boundary is 2048 latent columns wide.", ""]
    for k, v in r["assumptions"].items():
        if k == "links":
            L.append("- links (assumed, achieved): " + "; ".join(
                f"{name}: {x['bytes_per_s'] / 1e9:.0f} GB/s per direction, {x['latency_s'] * 1e6:.0f} µs a call"
                for name, x in v.items()))
        elif k == "notes":
            L += [f"- {n}" for n in v]
        else:
            L.append(f"- T1 {k[3:]}: {v}")
    L.append("")
    for fam, m in r["model"].items():
        L += [f"**{fam}**: T1 = {m['T1_s']:.2f} s; {m['spatial_convs']} spatial convs, {m['groupnorms']} GroupNorms, "
              f"{m['linfusion_layers']} LinFusion layers a step; FLOPs at 16K {m['flops_16k'] / 1e12:.1f} TFLOP, "
              f"constant part {m['const_frac']:.4%}; bands aligned to {m['align']} rows.", "",
              "| n | link | bytes / rank / step | calls | comm (bytes + latency) | compute / rank | speed-up serial "
              "| efficiency | speed-up perfect overlap |", "|---|---|---|---|---|---|---|---|---|"]
        for row in m["rows"]:
            if row["gather_each_step"]:
                continue
            L.append(f"| {row['n']} | {row['link']} | {_fmt_bytes(row['bytes']['total'])} | {row['calls']} | "
                     f"{_ms(row['comm_s'])} ({_ms(row['comm_bytes_s'])} + {_ms(row['comm_latency_s'])}) | "
                     f"{_ms(row['compute_s'])} | {row['speedup_serial']:.2f}x | {row['efficiency_serial']:.1%} | "
                     f"{row['speedup_overlap']:.2f}x |")
        g = [row for row in m["rows"] if row["gather_each_step"]]
        L += ["", "With the output gathered on one GPU after every step (the host's sampler holds the whole latent) "
              "instead of kept in bands: serial speed-up " + "; ".join(
                  f"n={row['n']} {row['link'].split(' (')[0]} {row['speedup_serial']:.2f}x" for row in g) + ".", ""]
    L += ["## Bytes per step per rank against image width (MODEL, exact formula)", "",
          "Halo bytes grow with the image WIDTH only (a band's boundary is one row across the image); the LinFusion "
          "states and GroupNorm statistics are a fixed size whatever the image; the height changes neither. "
          "Interior rank, batch 2, fp16 activations.", ""]
    for fam, m in r["model"].items():
        L += [f"**{fam}**: halo = {m['halo_bytes_per_latent_column']:,.0f} B x latent width (= px / 8) for an interior "
              f"rank ({m['halo_bytes_per_latent_column'] / 2:,.0f} B for an edge rank); LinFusion states "
              f"{_fmt_bytes(m['state_bytes_ring_n2'])} at n = 2 (x 2(n-1)/n / 1 for other n).", "",
              "| image width | latent width | halo / rank | states (n=2) | states (n=8) | GroupNorm (n=8) | total n=8 |",
              "|---|---|---|---|---|---|---|"]
        for row in m["by_width"]:
            n2, n8 = row["n2"], row["n8"]
            L.append(f"| {row['width_px']} px | {row['latent_width']} | {_fmt_bytes(n8['halo'])} | "
                     f"{_fmt_bytes(n2['state'])} | {_fmt_bytes(n8['state'])} | {_fmt_bytes(n8['groupnorm'])} | "
                     f"{_fmt_bytes(n8['halo'] + n8['state'] + n8['groupnorm'])} |")
        L.append("")
    return "\n".join(L) + "\n"


# ============================================================================================ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    m.add_argument("--sizes", nargs="*", default=["64x64", "128x64"], help="latent HxW of the timed steps")
    m.add_argument("--flop-sizes", nargs="*", default=[], help="extra latents for the inventory/FLOP fit")
    m.add_argument("--ranks-sizes", nargs="*", default=[], help="latents of a single 2-rank exactness/traffic check")
    m.add_argument("--configs", nargs="+", default=["plain1", "rank1", "rank2"])
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--append", action="store_true")
    sub.add_parser("report")
    a = ap.parse_args(argv)
    if a.cmd == "measure":
        measure(a)
    else:
        report(a)


if __name__ == "__main__":
    main()
