"""Peak memory of one UNet step, stock or LinFusion-patched, on this CPU: the measurement behind the memory
estimate in ``nodes/memory.py`` (used by ``benchmarks/bench_step_memory.py`` and ``tests/test_workflows.py``).

Run with the host Python from the repository root; prints one JSON line:

    python -m harness.step_memory --family sdxl --config linfusion --sizes 1024x1024 2048x1024
    python -m harness.step_memory --family sdxl --config linfusion --low-memory on --sizes 2048x1024

For each size (in the order given, one process) it runs one ``apply_model`` of the generated true-size UNet
(``fixtures.load_unet(family)``, computed in fp32 on CPU) and reports the growth of the process's peak RSS
(VmHWM reset through /proc/self/clear_refs) with ComfyUI's stock ``memory_required`` and the patched model's.
An allocator keeps freed pages, so a size measured after a larger one under-reads: give sizes in increasing
order, or one size per process (what the benchmark does).

glibc's malloc is pinned for the measurement (``peakmem.FIXED_MALLOC``, which says why; the process re-executes
itself with it set): unpinned, six runs of the SD-1.5 step at 1024x512 read 323 to 527 MB, pinned 275.3 MB.

``--low-memory on`` runs the patched model in its low-memory mode (nodes/lowmem.py). On a GPU the parked skips
sit in host memory, outside the device; on this CPU they would sit in the same RAM as everything else, so they
go into a host pool allocated and touched *before* the peak is reset (sized from the UNet's skip list), and the
peak growth is what the step keeps besides them: what the GPU would hold. The step runs with the patcher's
wrappers merged into transformer_options, as ComfyUI's sampler passes them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTEXT = {"sd15": (768, None), "sd21": (1024, None), "sdxl": (2048, 2816)}  # cross-attn width, adm width


def linfusion_file(family: str, seed: int = 0) -> Path:
    """A generated LinFusion checkpoint for ``family`` (own projections), cached beside the fixtures."""
    from . import fixtures, linfusion_fixtures
    d = fixtures.fixtures_dir() / f"step-memory-linfusion-{family}-{seed}"
    f = d / "diffusion_pytorch_model.safetensors"
    if not f.exists():
        linfusion_fixtures.write(family, d, layout="folder", seed=seed)
    return f


class HostPool:
    """Pre-touched host memory for parked skips (a bump allocator, reset per step)."""

    def __init__(self, nbytes: int):
        import torch
        self.buf = torch.empty(int(nbytes) + 4096, dtype=torch.uint8).fill_(1)
        self.offset = self.high = 0

    def __call__(self, shape, dtype):
        import math
        import torch
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        start = (self.offset + 63) // 64 * 64
        if start + n > self.buf.numel():
            raise MemoryError("host pool too small for the parked skips")
        self.offset = start + n
        self.high = max(self.high, self.offset)
        return self.buf[start:start + n].view(dtype).view(shape)


class BlockPeaks:
    """Where a step peaks: the peak RSS (above the step's starting RSS) while each child of each UNet block runs
    (ResBlock, transformer, up/downsampler), from VmHWM reset as the child starts. Tensors made between children
    (the decoder's concatenation) are alive inside the next child, so they count there."""

    def __init__(self, dm):
        from .peakmem import proc_status
        self.rows, self.base, self.t0 = [], 0, []
        blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(dm.input_blocks)] + [("middle_block", dm.middle_block)]
        blocks += [(f"output_blocks.{i}", b) for i, b in enumerate(dm.output_blocks)]
        inside = os.environ.get("LINFUSION_PROBE_INSIDE")  # e.g. output_blocks.9.1: that module's parts instead
        if inside:
            blocks = [(inside, dm.get_submodule(inside))]
        for name, block in blocks:
            children = block.named_modules() if inside else block.named_children()
            for cname, child in children:
                if inside and (not cname or cname.count(".") > 2):
                    continue
                # (a pre-hook's return value would replace the input: return None)
                child.register_forward_pre_hook(lambda *_: self._enter())
                child.register_forward_hook(
                    lambda *_, n=f"{name}.{cname}", t=type(child).__name__:
                    self.rows.append([n, t, proc_status("VmHWM") - self.base, self.t0.pop(), time.time_ns()]))

    def _enter(self):
        from .peakmem import reset_peak
        reset_peak()
        self.t0.append(time.time_ns())

    def start(self, base):
        self.rows, self.base, self.t0 = [], base, []

    def write(self, path, size, step_peak, allocated=None):
        """With ``allocated`` (a finished ``PeakAllocated``), each row's peak is the allocator's, not RSS, and a
        fourth column gives the bytes live as the child started (what earlier blocks left alive)."""
        for r in self.rows:
            t0, t1 = r.pop(3), r.pop(3)
            if allocated is not None:
                r[2] = allocated.peak_between(t0, t1)
                r.append(allocated.live_at(t0))
        rows = sorted(self.rows, key=lambda r: -r[2])
        with open(path, "a") as f:
            f.write(json.dumps({"size": size, "step_peak": step_peak, "blocks": self.rows}) + "\n")
        print(f"[block peaks {size}] step {step_peak / 1e6:.1f} MB; highest: "
              + ", ".join(f"{n} ({t}) {v / 1e6:.1f}" for n, t, v, *_ in rows[:6]), file=sys.stderr)


def measure(family: str, config: str, sizes: list, batch: int = 1, threshold: int = 0,
            check_sampling: bool = False, low_memory: str = "off", ff_chunk_elements: int | None = None,
            attn_chunk_elements: int | None = None, block_peaks: str | None = None,
            band_elements: int | None = None, allocated: bool = False) -> dict:
    import contextlib
    from .host import host_info, import_pack
    from .peakmem import PeakAllocated, PeakRSS
    from . import fixtures
    sys.path.insert(0, host_info()["comfyui"])
    from comfy.cli_args import args
    args.cpu = True
    import torch
    import comfy.model_management as mm
    import comfy.sd

    pack = import_pack()
    lf = linfusion_file(family) if config == "linfusion" else None
    m = fixtures.load_unet(family)
    stock_required = type(m.model).memory_required.__get__(m.model)
    if lf is not None:
        ck = pack.linfusion_core.checkpoint.load_checkpoint(lf)
        m = pack.nodes.patching.apply_linfusion(m, ck, threshold, low_memory)
        if ff_chunk_elements:  # chunk the feed-forwards at sizes below the usual threshold (every FF is chunked at 16K)
            for obj in m.object_patches.values():
                if isinstance(obj, pack.linfusion_core.chunked.TokenChunkedFeedForward):
                    obj.chunk_elements = int(ff_chunk_elements)
        if attn_chunk_elements:  # the low-memory mode's token chunks of the LinFusion layers, smaller than usual
            pack.linfusion_core.layer.LinFusionAttention.chunk_elements = int(attn_chunk_elements)
        if band_elements:  # the mode's convolutions by bands of rows, from smaller inputs and in smaller bands
            pack.nodes.lowmem.BAND_ELEMENTS = int(band_elements)
    mm.load_models_gpu([m])
    options = fixtures.sampling_options(m)
    unet_cfg = m.model.model_config.unet_config
    ctx_dim, adm_dim = CONTEXT[family]
    gen = torch.Generator().manual_seed(0)

    def step(x):
        kw = {"c_crossattn": torch.randn(x.shape[0], 77, ctx_dim, generator=gen)}
        if adm_dim:
            kw["y"] = torch.randn(x.shape[0], adm_dim, generator=gen)
        m.model.apply_model(x, torch.tensor([1.5] * x.shape[0]), transformer_options=dict(options), **kw)

    probe = BlockPeaks(m.model.diffusion_model) if block_peaks else None
    out = []
    with torch.inference_mode():
        step(torch.randn(batch, 4, 16, 16, generator=gen))  # warm-up: lazy init outside the measurement
        for w, h in sizes:
            x = torch.randn(batch, 4, h // 8, w // 8, generator=gen)
            pool = None
            if lf is not None and low_memory != "off":
                pool = HostPool(pack.linfusion_core.lowmem.skip_bytes(
                    x.shape, unet_cfg["channel_mult"], unet_cfg["model_channels"], unet_cfg["num_res_blocks"], 4))
                pack.nodes.lowmem.HOST_ALLOC = pool
            t0 = time.perf_counter()
            with PeakRSS() as p, (PeakAllocated() if allocated else contextlib.nullcontext()) as pa:
                if probe:
                    probe.start(p.base)
                step(x)
            if probe:
                probe.write(block_peaks, f"{w}x{h}", pa.peak if pa else p.peak, pa)
            secs = time.perf_counter() - t0
            pack.nodes.lowmem.HOST_ALLOC = None
            shape = tuple(x.shape)
            out.append({"w": w, "h": h, "batch": batch, "latent_px": batch * (h // 8) * (w // 8), "peak": p.peak,
                        "allocated_peak": pa.peak if pa else None, "seconds": secs, "parked": pool.high if pool else 0,
                        "stock_formula": stock_required(shape), "model_estimate": m.model.memory_required(shape)})
    res = {"family": family, "config": config, "low_memory": low_memory, "weights_bytes": int(m.model_size()),
           "ff_chunk_elements": ff_chunk_elements, "attn_chunk_elements": attn_chunk_elements,
           "band_elements": band_elements,
           "model_config": type(m.model.model_config).__name__,
           "dtype": str(m.model.get_dtype()).replace("torch.", ""), "threads": torch.get_num_threads(),
           "sizes": out}
    if lf is not None:
        est = pack.nodes.memory.installed_estimate(m)
        res["object_patch"] = est is not None
        res["estimates"] = [est((r["batch"], 4, r["h"] // 8, r["w"] // 8)) if est else None for r in out]
        if est is not None and getattr(est, "low_memory", None):
            res["estimates_low_memory"] = [est((r["batch"], 4, r["h"] // 8, r["w"] // 8), low_memory=True)
                                           for r in out]
    if check_sampling:
        # Sampling from an unloaded model: every load_models_gpu call that loads it (our PREPARE_SAMPLING wrapper's
        # and ComfyUI's own in _prepare_sampling) is recorded, with the memory it was told to expect; during
        # sampling the model's own memory_required (what ComfyUI's batching check reads) is the estimate.
        # The recorder calls straight through to ComfyUI's function; it only notes the arguments.
        import comfy.sample
        real_load, loads = mm.load_models_gpu, []

        def recording_load(models, memory_required=0, *a, minimum_memory_required=None, **kw):
            if any(x is m for x in models):
                loads.append([memory_required, minimum_memory_required])
            return real_load(models, memory_required, *a, minimum_memory_required=minimum_memory_required, **kw)

        mm.unload_all_models()
        mm.load_models_gpu = recording_load
        try:
            noise = torch.randn(1, 4, 8, 8, generator=gen)
            cond = {"pooled_output": torch.randn(1, 1280)} if adm_dim else {}
            pos = [[torch.randn(1, 77, ctx_dim, generator=gen), cond]]
            comfy.sample.sample(m, noise, 1, 1.0, "euler", "normal", pos, pos, torch.zeros_like(noise), seed=0)
        finally:
            mm.load_models_gpu = real_load
        res["sampling_loads"] = loads
        res["stock_preload"] = [stock_required((2, 4, 8, 8)), stock_required((1, 4, 8, 8))]
        res["during_sampling"] = m.model.memory_required((2, 4, 64, 128))
        if lf is not None and est:
            res["expected_preload"] = [est((2, 4, 8, 8)), est((1, 4, 8, 8))]
            res["expected_during_sampling"] = est((2, 4, 64, 128))
    return res


def main(argv=None):
    from .peakmem import run_with_fixed_malloc
    run_with_fixed_malloc("harness.step_memory", argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(CONTEXT), default="sd15")
    ap.add_argument("--config", choices=["stock", "linfusion"], default="linfusion")
    ap.add_argument("--sizes", nargs="+", default=["512x256"], help="WxH in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threshold", type=int, default=0, help="softmax_below_tokens of ApplyLinFusion")
    ap.add_argument("--check-sampling", action="store_true")
    ap.add_argument("--low-memory", choices=["off", "on", "auto"], default="off",
                    help="ApplyLinFusion's low_memory (nodes/lowmem.py)")
    ap.add_argument("--ff-chunk-elements", type=int,
                    help="run the patched feed-forwards in chunks of this many elements (default: the pack's)")
    ap.add_argument("--attn-chunk-elements", type=int,
                    help="with --low-memory: run the LinFusion layers in token chunks of this many elements "
                         "(default: the pack's)")
    ap.add_argument("--block-peaks", metavar="FILE",
                    help="append the peak while each child of each UNet block runs to FILE (JSON lines; the top "
                         "six go to stderr): where the step peaks. LINFUSION_PROBE_INSIDE=output_blocks.9.1 probes "
                         "that module's parts instead. The probe resets the peak per child, so the step's own "
                         "reading is then only the last child's")
    ap.add_argument("--band-elements", type=int,
                    help="with --low-memory: run the ResBlocks' and upsamplers' convolutions by bands of this many "
                         "input elements, from inputs of two bands on (default: the pack's)")
    ap.add_argument("--allocated", action="store_true",
                    help="also measure the peak of the bytes live in torch's CPU allocator (peakmem.PeakAllocated: "
                         "the counterpart of CUDA's max_memory_allocated, without the pages RSS counts that no "
                         "tensor holds); runs the step under the profiler, so its time reads high. With "
                         "--block-peaks, the probe reports these peaks")
    ap.add_argument("--no-mkldnn", action="store_true",
                    help="run torch's own CPU convolutions instead of oneDNN's (torch.backends.mkldnn.enabled = "
                         "False): no blocked copies of whole inputs for 1x1 convolutions (which a GPU's NCHW "
                         "kernels do not make either), but im2col buffers of 9x the input for 3x3 ones")
    a = ap.parse_args(argv)
    if a.no_mkldnn:
        import torch
        torch.backends.mkldnn.enabled = False
    sizes = [[int(v) for v in s.lower().split("x")] for s in a.sizes]
    print(json.dumps(measure(a.family, a.config, sizes, a.batch, a.threshold, a.check_sampling, a.low_memory,
                             a.ff_chunk_elements, a.attn_chunk_elements, a.block_peaks,
                             a.band_elements, a.allocated)), flush=True)


if __name__ == "__main__":
    main()
