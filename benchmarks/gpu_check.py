#!/usr/bin/env python3
"""The prepared GPU check (issue 10, item 3): every GPU measurement of this pack in one run, with a time budget.

Sections (each in its own Python process, killed at its time limit; what it measured so far is kept):

  attention  linfusion_core.attention on one device: the Triton kernels and the torch fast path, fp16, bf16 and
             fp32, token counts up to 4,194,304 at batch 2 (SD-1.5's first level: 8 heads of 40, C=320). Max
             error against linear_attention_reference in float64 (up to 1,048,576 tokens; above that against the
             torch path), time (CUDA events after a warm-up call, median of several calls) and the fraction of the
             card's peak HBM bandwidth reached (bytes of q, k, v read and out written / time; peak looked up by
             card name, the assumption recorded).
  unet       one true-size SD-1.5 UNet step (batch 2, as the sampler runs it with CFG; ComfyUI's own model
             classes, generated random weights, fp16 on a GPU) at 1024², 2048², 4096² and the 16K stage
             (16384×8192 px, latent 2048×1024): stock attention, LinFusion, and no self-attention at all (the
             floor). Time and torch.cuda.max_memory_allocated. Stock is skipped where ComfyUI's own memory formula
             says it cannot fit or its time, extrapolated quadratically, would not fit the budget (and it says
             which); an out-of-memory error is caught and recorded.
  lowmem     the low-memory mode (nodes/lowmem.py, issue 13): one step of the SD-XL 16K stage (16384×8192 px,
             batch 1, fp16, an in-memory SD-XL stand-in) with LinFusion, without and with the mode: time and peak
             torch.cuda.max_memory_allocated with the weights resident, against 16 GB, and the UNet layer where
             the step peaked; then SD-1.5's 16K step with the mode, against 10 GB, while time lasts
             (benchmarks/gpu_lowmem.py; the dry run: SD-1.5 at 64×64 px).
  parallel   the spatial-parallel path (linfusion_core/parallel.py, issue 14) on one rank against the plain UNet call:
             SD-1.5 stand-in with LinFusion, batch 2, fp16, at 2048², 4096² and the 16K stage; time ratio, peak
             memory and the outputs' difference (benchmarks/gpu_parallel.py; the dry run: 64×64 px, gloo).
  chain      workflows/linfusion_sd15_16k.json at full size (1024×512 → … → 16384×8192), in-process through
             ComfyUI's executor (execution.PromptExecutor, this pack loaded as a custom node by
             nodes.init_extra_nodes) from the API prompt made beforehand by the real frontend
             (benchmarks/sd15_16k_api.json). ComfyUI is set up in main.py's order: its CUDA allocator choice
             (cuda_malloc), then DynamicVRAM (comfy-aimdo, ModelPatcherDynamic) where this ComfyUI has it and it
             initialises, classic model management otherwise; which one ran is recorded, and a DynamicVRAM run
             that fails is repeated classic if time is left. Sampling steps are cut to --chain-steps per stage
             (denoise kept, so each stage runs the last steps of its usual schedule). Time, peak allocated memory
             and peak device memory in use (NVML) per node and per stage, and the time of every sampling step.

Stand-in weights: a true-architecture SD-1.5 checkpoint with random weights (harness/fixtures.py) and LinFusion
weights of the true shapes (harness/linfusion_fixtures.py) are generated where the check runs (in the background
while the attention section runs). Images are noise; times and memory are real.

Output: benchmarks/results/gpu_check_<card>.json and .md (card name from torch.cuda.get_device_name, with torch,
triton and ComfyUI versions, date, budget, and what was skipped and why). --dry writes gpu_check_cpu-dry-run.*.

CPU dry mode (--dry): the same code paths at tiny sizes on the CPU (100 tokens, two blocks of 64 with masking; one
UNet step per config at 64×64 px; the chain cut to its first 2 stages at 1/16 size, 1 step each; the Triton kernels
under TRITON_INTERPRET=1; ComfyUI with --fp16-unet to halve its memory). Timings are CPU timings, not GPU results. tests/test_gpu_check.py runs it (and tests
the skip rules, the bandwidth table and the prompt surgery on their own).

On the GPU machine (no network; torch, triton and most of ComfyUI's needs are there): first, here,
`python3 benchmarks/gpu_prepare.py` copies ComfyUI 0.33.0 and the missing wheels into .gpu-carry/ (ignored) and
prints the device command; benchmarks/README.md has it. In short:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .gpu-carry/wheels/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu_check.py --comfyui .gpu-carry/comfyui --budget 480
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_lowmem  # noqa: E402  (the low-memory rows, issue 13)
import gpu_parallel  # noqa: E402  (the spatial-parallel one-rank overhead, issue 14)
API_PROMPT = BENCH / "sd15_16k_api.json"
RESULTS = BENCH / "results"
CARRY = REPO / ".gpu-carry"
PACK_DIR_NAME = "ComfyUI-LinFusion"
CKPT_NAME = "standin-sd15.safetensors"
LINFUSION_NAME = "standin-sd15/diffusion_pytorch_model.safetensors"
PROMPT_ID = "linfusion-gpu-check"

# Peak HBM bandwidth by card name (NVIDIA datasheets). First match wins, so the specific names come first.
PEAK_BANDWIDTH = [
    (("GH200",), 4.0e12, "NVIDIA GH200 (96 GB HBM3): 4.0 TB/s, datasheet"),
    (("H200",), 4.8e12, "NVIDIA H200 (141 GB HBM3e): 4.8 TB/s, datasheet"),
    (("H100", "NVL"), 3.9e12, "NVIDIA H100 NVL: 3.9 TB/s, datasheet"),
    (("H100", "PCIE"), 2.0e12, "NVIDIA H100 PCIe: 2.0 TB/s, datasheet"),
    (("H100",), 3.35e12, "NVIDIA H100 SXM (80 GB HBM3): 3.35 TB/s, datasheet (an H100 that is neither PCIe nor NVL "
                         "is taken for the SXM part)"),
    (("A100", "80GB", "PCIE"), 1.935e12, "NVIDIA A100 80GB PCIe: 1.935 TB/s, datasheet"),
    (("A100", "80GB"), 2.039e12, "NVIDIA A100 80GB SXM: 2.039 TB/s, datasheet"),
    (("A100",), 1.555e12, "NVIDIA A100 40GB: 1.555 TB/s, datasheet"),
]


def peak_bandwidth(name: str | None) -> tuple[float | None, str]:
    """(peak bytes/s, the assumption in words) for a device name as torch.cuda.get_device_name gives it."""
    up = (name or "").upper()
    for keys, bw, label in PEAK_BANDWIDTH:
        if all(k in up for k in keys):
            return bw, label
    return None, f"no peak bandwidth known for {name!r}: fraction of peak not computed"


# Configurations. Sections get at most their share of the whole budget; the chain gets what is left.
GPU_CONFIG = {
    "attention": {"tokens": [4096, 16384, 65536, 262144, 1048576, 2097152, 4194304], "batch": 2, "heads": 8,
                  "channels": 320, "dtypes": ["float16", "bfloat16", "float32"], "impls": ["torch", "triton"],
                  "ref_max_tokens": 1048576, "min_reps": 3, "max_reps": 20, "target_s": 0.3, "warmup": 1},
    "unet": {"sizes": [[1024, 1024], [2048, 2048], [4096, 4096], [16384, 8192]], "batch": 2,
             "configs": ["stock", "linfusion", "no-self-attn"], "stock_max_latent_px": None, "max_reps": 3,
             "target_s": 1.5, "warmup": True},
    "chain": {"stages": 5, "steps": 2, "scale": 1.0},
    "lowmem": gpu_lowmem.GPU,
    "parallel": gpu_parallel.GPU,
    # The 16K decode (latent 2048x1024) of the SD-1.5 and SD-XL VAE in fp16: ComfyUI's VAE Decode (Tiled) against
    # this pack's, at one tile size. Opt-in on a GPU (--sections ... vae): it needs about 80 GiB of host RAM.
    "vae": {"sizes": [[16384, 8192]], "archs": ["sd15", "sdxl"], "impls": ["linfusion", "comfyui"],
            "tile": 1024, "overlap": 64, "dtype": "float16"},
    # at most; the chain (slowest, 16K) gets the rest
    "shares": {"attention": 0.15, "unet": 0.2, "lowmem": 0.15, "parallel": 0.1, "vae": 0.3},
    "budget": 480.0,
}
DRY_CONFIG = {
    "attention": {"tokens": [100], "batch": 2, "heads": 8, "channels": 320,
                  "dtypes": ["float16", "bfloat16", "float32"], "impls": ["torch", "triton"],
                  "ref_max_tokens": 1 << 20, "min_reps": 1, "max_reps": 3, "target_s": 0.05, "warmup": 0},
    # One tiny size: the skip rules (unet_skip_reason) are tested on their own in tests/test_gpu_check.py.
    "unet": {"sizes": [[64, 64]], "batch": 2, "configs": ["stock", "linfusion", "no-self-attn"],
             "stock_max_latent_px": None, "max_reps": 1, "target_s": 0.0, "warmup": False},
    "chain": {"stages": 2, "steps": 1, "scale": 1 / 16},
    "lowmem": gpu_lowmem.DRY,
    "parallel": gpu_parallel.DRY,
    "vae": {"sizes": [[128, 64]], "archs": ["sd15", "sdxl"], "impls": ["linfusion", "comfyui"],
            "tile": 64, "overlap": 16, "dtype": "float32"},  # fp16 convolutions crawl on a CPU
    "shares": {"attention": 0.2, "unet": 0.3, "lowmem": 0.15, "parallel": 0.1, "vae": 0.15},
    # Generous: on a shared 2-core machine one tiny UNet call can take minutes when memory is short; the time
    # guards themselves are tested apart (tests/test_gpu_check.py).
    "budget": 1500.0,
}


# ------------------------------------------------------------------------------------------------ small helpers
def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def clean(x):
    """JSON-safe copy: non-finite floats become strings ("nan", "inf"), tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def write_json(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "unknown"


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300] if s else ''}"


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def comfyui_version(comfyui: Path) -> str | None:
    try:
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (Path(comfyui) / "comfyui_version.py").read_text())
        return m.group(1) if m else None
    except OSError:
        return None


def dist_version(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class Record:
    """A section's results, rewritten to disk after every change (so a killed section keeps what it measured)."""

    def __init__(self, path: Path, section: str):
        self.path = Path(path)
        self.data = {"section": section, "status": "running", "started": now_iso(), "env": {}, "rows": [],
                     "notes": [], "skipped": []}
        self.save()

    def row(self, r: dict) -> dict:
        self.data["rows"].append(r)
        self.save()
        return r

    def note(self, msg: str) -> None:
        self.data["notes"].append(msg)
        log(msg)
        self.save()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        log(f"skip {what}: {why}")
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


def torch_env(torch, cuda: bool) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "triton": dist_version("triton") or dist_version("pytorch-triton"), "cpu_threads": torch.get_num_threads(),
           "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "native (caching allocator)"}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), device_memory=p.total_memory, sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}")
        try:
            import torch.cuda.memory
            env["allocator_backend"] = torch.cuda.memory.get_allocator_backend()
        except Exception:
            pass
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return env


def imported_distributions() -> list[str]:
    """Distributions whose top-level modules this process imported (which wheels the GPU machine needs)."""
    import importlib.metadata
    try:
        pkgs = importlib.metadata.packages_distributions()
    except Exception:
        return []
    names = set()
    for mod in list(sys.modules):
        top = mod.split(".")[0]
        for d in pkgs.get(top, []):
            names.add(d.lower().replace("_", "-"))
    return sorted(names)


# ================================================================================================ attention section
def time_calls(fn, torch, cuda: bool, min_reps: int, max_reps: int, target_s: float) -> tuple[float, float, int]:
    """(median s, min s, calls) of fn(): CUDA events around each call on a GPU, perf_counter on the CPU."""
    times = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < target_s):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1000.0)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    n = len(times)
    med = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    return med, times[0], n


def max_rel_diff(a, b, torch, chunk: int = 1 << 18) -> tuple[float, float]:
    """(max |a - b|, max |b|) over (B, N, C) tensors, in token chunks (no full-size temporaries)."""
    diff, scale = 0.0, 0.0
    for s in range(0, a.shape[1], chunk):
        wide = torch.float64 if b.dtype == torch.float64 else torch.float32  # the fp64 reference stays fp64
        x = a[:, s:s + chunk].to(wide)
        y = b[:, s:s + chunk].to(wide)
        diff = max(diff, (x - y).abs().max().item())
        scale = max(scale, y.abs().max().item())
    return diff, scale


def child_attention(spec: dict, rec: Record) -> None:
    import torch
    cfg, deadline, dry = spec["cfg"], spec["deadline"], spec["dry"]
    cuda = torch.cuda.is_available() and not dry
    dev = torch.device("cuda" if cuda else "cpu")
    from linfusion_core import attention as A
    env = torch_env(torch, cuda)
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    peak, assumption = peak_bandwidth(env.get("device")) if cuda else (None, "CPU: no HBM peak; fraction not computed")
    env["peak_bandwidth"] = peak
    env["peak_bandwidth_assumption"] = assumption
    B, H, C = cfg["batch"], cfg["heads"], cfg["channels"]
    env["shape"] = f"(B={B}, tokens, C={C}), {H} heads of {C // H}"
    rec.data["env"] = env
    rec.save()
    impl_fns = {"triton": A.linear_attention_triton, "torch": A.linear_attention_torch_fast,
                "reference": A.linear_attention_reference}
    if not cuda and not env["triton_interpret"]:
        rec.skip("triton (all sizes)", "CPU without TRITON_INTERPRET=1")
    last: dict = {}  # impl -> (tokens, seconds per call)
    compiled: set = set()
    broken: dict = {}  # (impl, dtype) -> error at a smaller size
    for N in cfg["tokens"]:
        for dname in cfg["dtypes"]:
            dtype = getattr(torch, dname)
            elsize = torch.empty((), dtype=dtype).element_size()
            nbytes = 4 * B * N * C * elsize  # q, k, v read + out written (k, v have N tokens too)
            todo = []
            for impl in cfg["impls"]:
                if impl == "triton" and not cuda and not env["triton_interpret"]:
                    continue
                if (impl, dname) in broken:
                    rec.skip(f"{impl} {dname} N={N}", f"failed at a smaller size ({broken[(impl, dname)]})")
                    continue
                todo.append(impl)
            if not todo:
                continue
            # Time guard: predict this cell from the last size (linear in N), calls = warm-up + reps.
            pred = 0.0
            for impl in todo:
                if impl in last:
                    per = last[impl][1] * N / last[impl][0]
                    pred += per * (1 + cfg["warmup"] + max(cfg["min_reps"], min(cfg["max_reps"],
                                                                               cfg["target_s"] / max(per, 1e-9))))
                if impl == "triton" and (dname not in compiled):
                    pred += 5.0 if cuda else 0.0
            left = deadline - time.time()
            if pred > left or left <= 0:
                rec.skip(f"N={N} {dname} ({', '.join(todo)})", f"predicted {pred:.0f} s > {left:.0f} s left")
                continue
            try:
                g = torch.Generator(device=dev).manual_seed(N)
                q, k, v = (torch.randn(B, N, C, generator=g, device=dev, dtype=dtype) for _ in range(3))
            except Exception as e:  # out of memory for the inputs themselves
                rec.skip(f"N={N} {dname}", f"inputs: {first_line(e)}")
                if cuda:
                    torch.cuda.empty_cache()
                continue
            ref = None
            if N <= cfg["ref_max_tokens"]:
                try:
                    ref = A.linear_attention_reference(q.double(), k.double(), v.double(), H)
                except Exception as e:
                    rec.note(f"fp64 reference at N={N} {dname} failed: {first_line(e)}")
                    if cuda:
                        torch.cuda.empty_cache()
            outs = {}
            for impl in todo:
                fn = impl_fns[impl]
                row = {"tokens": N, "batch": B, "heads": H, "channels": C, "dtype": dname, "impl": impl,
                       "bytes": nbytes}
                try:
                    t = time.perf_counter()
                    out = fn(q, k, v, H)
                    if cuda:
                        torch.cuda.synchronize()
                    row["first_call_s"] = time.perf_counter() - t  # includes Triton compilation the first time
                    if impl == "triton":
                        compiled.add(dname)
                    row["finite"] = bool(torch.isfinite(out).all().item())
                    row["out_dtype"] = str(out.dtype).replace("torch.", "")
                    if ref is not None:
                        d, s = max_rel_diff(out, ref, torch)
                        row.update(max_abs_err=d, ref_max_abs=s, rel_err=d / max(s, 1e-30), error_reference="fp64")
                    if impl != "torch" and "torch" in outs:
                        d, s = max_rel_diff(out, outs["torch"], torch)
                        row["rel_diff_vs_torch"] = d / max(s, 1e-30)
                    if impl == "torch" and "triton" in todo:
                        outs["torch"] = out  # kept to compare the Triton output against, above the fp64 limit
                    del out  # free before the timed calls (4.2 M fp32 tokens: 10.7 GB per tensor)
                    for _ in range(cfg["warmup"]):
                        fn(q, k, v, H)
                    med, mn, reps = time_calls(lambda: fn(q, k, v, H), torch, cuda, cfg["min_reps"],
                                               cfg["max_reps"], cfg["target_s"])
                    row.update(seconds=med, seconds_min=mn, reps=reps, timer="cuda events" if cuda else "perf_counter",
                               bytes_per_s=nbytes / med)
                    row["hbm_fraction"] = (nbytes / med) / peak if peak else None
                    last[impl] = (N, med)
                    log(f"attention {impl:6s} {dname:8s} N={N:>8d}: {med * 1e3:9.3f} ms  "
                        f"{nbytes / med / 1e9:8.1f} GB/s" + (f" ({row['hbm_fraction'] * 100:5.1f}% of peak)"
                                                              if peak else "")
                        + (f"  rel err {row['rel_err']:.2e}" if "rel_err" in row else "")
                        + (f"  vs torch {row['rel_diff_vs_torch']:.2e}" if "rel_diff_vs_torch" in row else ""))
                except Exception as e:
                    row["error"] = first_line(e)
                    row["traceback"] = traceback.format_exc()[-2000:]
                    broken[(impl, dname)] = row["error"]
                    log(f"attention {impl} {dname} N={N}: {row['error']}")
                    if cuda:
                        try:
                            torch.cuda.synchronize()
                            torch.cuda.empty_cache()
                        except Exception as e2:  # a sticky CUDA error: nothing more can run in this process
                            rec.row(row)
                            rec.note(f"CUDA unusable after that error ({first_line(e2)}); section stopped")
                            return
                rec.row(row)
            del q, k, v, ref, outs
            if cuda:
                torch.cuda.empty_cache()


# ================================================================================================ ComfyUI set-up
def comfy_argv(spec: dict, extra: list | None = None) -> list:
    argv = ["main.py", "--base-directory", spec["base"]]
    if spec["dry"]:
        # --fp16-unet: the UNet's weights stay fp16 (computed in fp32 by ComfyUI's manual cast on the CPU), half
        # the memory of fp32 weights; the dry run has to live beside other work on a small shared machine.
        argv += ["--cpu", "--fp16-unet"]
    return argv + list(extra or [])


def import_comfy(spec: dict, extra_args: list | None = None):
    """ComfyUI's modules importable with its own argument parser fed (base directory, --cpu in dry mode)."""
    comfyui = spec["comfyui"]
    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    saved = sys.argv
    sys.argv = comfy_argv(spec, extra_args)
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        from comfy.cli_args import args
    finally:
        sys.argv = saved
    return args


def comfy_env(spec: dict) -> dict:
    env = {"comfyui": spec["comfyui"], "comfyui_version": comfyui_version(Path(spec["comfyui"])),
           "comfy_aimdo": dist_version("comfy-aimdo"), "comfy_kitchen": dist_version("comfy-kitchen")}
    try:  # the attention ComfyUI picked for the stock model (sdpa, xformers, split, ...)
        import comfy.ldm.modules.attention as cattn
        env["comfy_attention"] = getattr(cattn.optimized_attention, "__name__", str(cattn.optimized_attention))
    except Exception as e:
        env["comfy_attention"] = f"unknown ({first_line(e)})"
    return env


def record_error(row: dict, e: BaseException, what: str) -> str:
    """A failed row: its error's first line (marked OOM when it is one), the traceback's tail, a log line."""
    oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
    row["error"] = ("OOM: " if oom else "") + first_line(e)
    row["traceback"] = traceback.format_exc()[-2000:]
    log(f"{what}: {row['error']}")
    return row["error"]


def section_start(spec: dict, rec: Record):
    """The common start of a model section in its process: ComfyUI imported as the spec says, the environment
    recorded, this pack imported. Returns (torch, comfy.model_management, the pack, cuda?, the env dict)."""
    import_comfy(spec)
    import torch
    import comfy.model_management as mm
    from harness.host import import_pack
    cuda = mm.get_torch_device().type == "cuda"
    env = torch_env(torch, cuda)
    env.update(comfy_env(spec))
    rec.data["env"] = env
    rec.save()
    return torch, mm, import_pack("LinFusionGPUCheck"), cuda, env


# ================================================================================================ unet section
def unet_skip_reason(name: str, latent_px: int, formula: float, total_mem: float | None, last, left: float,
                     stock_max_latent_px: int | None = None) -> str | None:
    """Why a UNet-step cell is skipped, or None to run it. ``formula``: ComfyUI's BaseModel.memory_required for
    the input; ``total_mem``: the card's memory (None on the CPU); ``last``: (latent px, seconds) of this config at
    the previous size; ``left``: seconds left in the section. Stock attention is extrapolated quadratically in the
    latent area, everything else linearly, with a 30 % margin."""
    if left <= 0:
        return "the section's time is spent"
    if name == "stock":
        if stock_max_latent_px and latent_px > stock_max_latent_px:
            return f"stock limited to {stock_max_latent_px} latent px in this configuration"
        if total_mem and formula > total_mem:
            return (f"ComfyUI's memory formula (BaseModel.memory_required) predicts {formula / 2**30:.1f} GiB > "
                    f"the card's {total_mem / 2**30:.1f} GiB")
    if last:
        px0, t0 = last
        ratio = latent_px / px0
        pred = t0 * (ratio ** 2 if name == "stock" else ratio) * 1.3
        if pred > left:
            return (f"predicted {pred:.0f} s ({'quadratic' if name == 'stock' else 'linear'} in latent area from "
                    f"{t0:.2f} s at {px0} latent px) > {left:.0f} s left")
    return None


def child_unet(spec: dict, rec: Record) -> None:
    cfg, deadline, dry = spec["cfg"], spec["deadline"], spec["dry"]
    import_comfy(spec)
    import gc
    import torch
    import comfy.model_management as mm
    import comfy.sd
    sys.path.insert(0, str(BENCH))
    import unet_variants
    from harness.host import import_pack
    from harness.peakmem import PeakRSS

    cuda = mm.get_torch_device().type == "cuda"
    env = torch_env(torch, cuda)
    env.update(comfy_env(spec))
    env["model_management"] = "classic ModelPatcher (DynamicVRAM is not set up in this section)"
    rec.data["env"] = env
    rec.save()
    pack = import_pack("LinFusionGPUCheck")
    t = time.perf_counter()
    unet = comfy.sd.load_checkpoint_guess_config(spec["ckpt_path"], output_vae=False, output_clip=False)[0]
    lf = pack.linfusion_core.checkpoint.load_checkpoint(spec["linfusion_path"])
    rec.note(f"loaded the stand-in UNet and LinFusion weights in {time.perf_counter() - t:.1f} s")
    builders = unet_variants.builders(pack, unet, lf)
    device = mm.get_torch_device()
    dtype = unet.model.get_dtype()
    env["unet_dtype"] = str(dtype).replace("torch.", "")
    total_mem = mm.get_total_memory(device)
    env["total_memory"] = total_mem
    B = cfg["batch"]
    last: dict = {}
    failed: dict = {}
    warmed: set = set()
    for w, h in cfg["sizes"]:
        lh, lw = h // 8, w // 8
        shape = [B, 4, lh, lw]
        for name in cfg["configs"]:
            what = f"{name} {w}x{h}"
            if name in failed:
                rec.skip(what, f"failed at a smaller size ({failed[name]})")
                continue
            formula = unet.model.memory_required(shape)
            why = unet_skip_reason(name, lh * lw, formula, total_mem if cuda else None, last.get(name),
                                   deadline - time.time(), cfg.get("stock_max_latent_px"))
            if why:
                rec.skip(what, why)
                continue
            row = {"size": [w, h], "latent": [lw, lh], "batch": B, "config": name,
                   "dtype": env["unet_dtype"], "comfy_formula_bytes": formula}
            m = None
            try:
                m = builders[name]()
                mm.load_models_gpu([m])
                try:
                    row["estimate_bytes"] = m.model.memory_required(shape)  # LinFusion's object patch, if any
                except Exception:
                    pass
                to = dict(m.model_options.get("transformer_options", {}))
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(shape, generator=gen).to(device)
                c = torch.randn(B, 77, 768, generator=gen).to(device)
                sigma = torch.full((B,), 1.0, device=device)
                with torch.inference_mode():
                    if cfg["warmup"] and name not in warmed:  # kernels compiled / autotuned at a small size
                        wx = torch.randn(B, 4, 16, 16, device=device)
                        m.model.apply_model(wx, sigma, c_crossattn=c,
                                            transformer_options=dict(to, original_shape=list(wx.shape)))
                        warmed.add(name)
                    to["original_shape"] = list(shape)
                    times = []
                    meter = unet_variants.CudaPeak(torch) if cuda else PeakRSS()
                    with meter:
                        while True:
                            t = time.perf_counter()
                            out = m.model.apply_model(x, sigma, c_crossattn=c, transformer_options=to)
                            if cuda:
                                torch.cuda.synchronize()
                            times.append(time.perf_counter() - t)
                            if (len(times) >= cfg["max_reps"] or sum(times) >= cfg["target_s"]
                                    or time.time() + times[-1] > deadline):
                                break
                    row["finite"] = bool(torch.isfinite(out).all().item())
                    del out
                times.sort()
                row.update(seconds=times[len(times) // 2], seconds_all=times, reps=len(times),
                           peak_bytes=meter.peak, memory_method=("torch.cuda.max_memory_allocated above the "
                                                                 "allocation at the step's start" if cuda else
                                                                 "peak RSS growth (VmHWM) during the step"))
                if cuda:
                    row["peak_total_bytes"] = meter.total
                if name.startswith("linfusion"):
                    probe = torch.empty(1, 8, 320, device=device, dtype=dtype)
                    row["attention_impl"] = pack.linfusion_core.attention.selected_impl(probe, probe, probe, 8)
                last[name] = (lh * lw, row["seconds"])
                log(f"unet {name:13s} {w}x{h}: {row['seconds']:8.3f} s  peak +{meter.peak / 2**20:9.0f} MiB")
            except Exception as e:
                failed[name] = record_error(row, e, f"unet {name} {w}x{h}")
            rec.row(row)
            del m
            mm.unload_all_models()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


# ================================================================================================ chain section
def stage_index(title: str | None) -> int:
    """'Stage 3: ...' -> 3; setup nodes (no group) -> 0."""
    m = re.match(r"\s*Stage\s+(\d+)", title or "")
    return int(m.group(1)) if m else 0


def chain_prompt(doc: dict, stages: int, steps: int, scale: float, object_info: dict | None = None) -> dict:
    """The API prompt of the 16K workflow cut to its first ``stages`` stages, stand-in model names, sampler steps
    min(steps, the workflow's) with denoise kept, sizes x ``scale`` (harness.runner.scale_prompt's rules)."""
    from harness import runner
    api = {nid: n for nid, n in doc["prompt"].items() if stage_index(doc["stages"].get(nid)) <= stages}
    gone = set(doc["prompt"]) - set(api)
    for nid, n in api.items():
        for v in n["inputs"].values():
            if isinstance(v, list) and len(v) == 2 and str(v[0]) in gone:
                raise ValueError(f"node {nid} reads node {v[0]} of a later stage")
    api = runner.set_models(api, ckpt=CKPT_NAME, linfusion=LINFUSION_NAME)
    if scale != 1.0:
        api = runner.scale_prompt(api, object_info or {}, scale=scale)
    for n in api.values():
        if n["class_type"] in ("KSampler", "KSamplerAdvanced") and "steps" in n["inputs"]:
            n["inputs"]["steps"] = max(1, min(int(steps), int(n["inputs"]["steps"])))
    return api


class ExecutionProbe:
    """Stands in for ComfyUI's PromptServer during an in-process PromptExecutor run: records per node wall time,
    peak allocated device memory (torch.cuda.max_memory_allocated, reset at each node start), peak device memory
    in use (NVML, sampled), peak RSS (VmHWM reset at each node start) and the time of every sampling step; stops
    the run (interrupt) once the deadline has passed."""

    def __init__(self, rec: Record, prompt: dict, stages: dict, cuda: bool, torch, deadline: float, nodes_mod):
        self.rec, self.prompt, self.stages, self.cuda, self.torch = rec, prompt, stages, cuda, torch
        self.deadline, self.nodes_mod = deadline, nodes_mod
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = PROMPT_ID
        self.sockets_metadata = {}
        self.records: dict = {}
        self.order: list = []
        self.current = None
        self.events: list = []
        self.interrupted_for_time = False
        self._nvml = None
        self._dev_peak = 0
        self._stop = None
        if cuda:
            self._start_sampler()
        rec.data["nodes"] = []
        rec.save()

    # -- device memory in use, sampled (counts what the caching allocator does not see: comfy-aimdo, cuBLAS...)
    def _start_sampler(self):
        import threading
        read = None
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
                                                           or 0))
            read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used  # noqa: E731
            self.device_memory_method = "NVML device memory used, sampled every 20 ms"
        except Exception:
            torch = self.torch
            read = lambda: (lambda f, t: t - f)(*torch.cuda.mem_get_info())  # noqa: E731
            self.device_memory_method = "cudaMemGetInfo (total - free), sampled every 20 ms"
        self._read = read
        self._base_used = read()
        self._stop = threading.Event()

        def loop():
            while not self._stop.is_set():
                try:
                    self._dev_peak = max(self._dev_peak, self._read())
                except Exception:
                    pass
                self._stop.wait(0.02)
        threading.Thread(target=loop, daemon=True).start()

    def close(self):
        self._close_node(time.perf_counter())
        if self._stop is not None:
            self._stop.set()

    # -- PromptServer surface used by the executor
    def send_sync(self, event, data, sid=None):
        now = time.perf_counter()
        if event == "executing":
            self._close_node(now)
            node = data.get("node") if isinstance(data, dict) else None
            if node is None:
                return
            self._open_node(str(node), now)
        elif event == "executed" and isinstance(data, dict):
            r = self.records.get(str(data.get("node")))
            if r is not None:
                imgs = (data.get("output") or {}).get("images") or []
                r["images"] = len(imgs)
        elif event in ("execution_error", "execution_interrupted", "execution_success", "execution_cached"):
            slim = {k: v for k, v in (data or {}).items() if k not in ("current_inputs", "current_outputs")}
            self.events.append([event, slim])

    def queue_updated(self, *a, **k):
        pass

    def send_progress_text(self, *a, **k):
        pass

    def __getattr__(self, name):  # anything else the executor or a node asks of the server: a no-op
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: None

    # -- progress hook (comfy.utils.set_progress_bar_global_hook), as main.py's hijack_progress
    def progress_hook(self, value, total, preview_image, prompt_id=None, node_id=None):
        if self.cuda:
            self.torch.cuda.synchronize()
        now = time.perf_counter()
        r = self.records.get(str(node_id)) if node_id is not None else None
        if r is None and self.current is not None:
            r = self.records[self.current]
        if r is not None:
            r.setdefault("progress", []).append([int(value), int(total), round(now - r["_t0"], 4)])
        self._check_deadline()
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()

    # -- bookkeeping
    def _check_deadline(self):
        if time.time() > self.deadline and not self.interrupted_for_time:
            self.interrupted_for_time = True
            self.rec.note("chain: time budget spent; interrupting the run")
            self.nodes_mod.interrupt_processing(True)

    def _open_node(self, nid: str, now: float):
        from harness.peakmem import proc_status, reset_peak
        self._check_deadline()
        n = self.prompt.get(nid, {})
        r = {"node": nid, "class_type": n.get("class_type", "?"), "stage": self.stages.get(nid) or "setup", "_t0": now}
        if self.cuda:
            self.torch.cuda.synchronize()
            try:
                self.torch.cuda.reset_peak_memory_stats()
            except Exception:
                pass
            self._dev_peak = self._read()
        reset_peak()
        r["rss_at_start"] = proc_status("VmRSS")
        self.records[nid] = r
        self.order.append(nid)
        self.current = nid
        log(f"chain start {nid:>3} {r['class_type']}")

    def _close_node(self, now: float):
        from harness.peakmem import proc_status
        if self.current is None:
            return
        r = self.records[self.current]
        if self.cuda:
            self.torch.cuda.synchronize()
            now = time.perf_counter()
            try:
                r["max_memory_allocated"] = self.torch.cuda.max_memory_allocated()
            except Exception as e:
                r["max_memory_allocated"] = None
                r["max_memory_allocated_error"] = first_line(e)
            r["device_used_peak"] = max(self._dev_peak, self._read())
        r["seconds"] = round(now - r.pop("_t0"), 4)
        if self.interrupted_for_time:  # ran into (or started after) the interrupt: cut short
            r["interrupted"] = True
        r["rss_peak"] = proc_status("VmHWM")
        prog = r.get("progress") or []
        if prog:  # seconds of each sampling step (the first includes the node's own set-up: model load, patching)
            ts = [0.0] + [p[2] for p in prog]
            r["step_seconds"] = [round(b - a, 4) for a, b in zip(ts, ts[1:])]
        self.rec.data["nodes"].append(r)
        self.rec.save()
        log(f"chain done  {r['node']:>3} {r['class_type']:<16} {r['seconds']:8.2f} s" +
            (f"  alloc peak {r['max_memory_allocated'] / 2**30:6.2f} GiB  device {r['device_used_peak'] / 2**30:6.2f}"
             f" GiB" if self.cuda and r.get("max_memory_allocated") is not None else "")
            + f"  RSS peak {r['rss_peak'] / 2**30:6.2f} GiB")
        self.current = None


def setup_comfy_like_main(spec: dict, rec: Record, classic: bool):
    """ComfyUI initialised in main.py's order: argument parsing, cuda_malloc (allocator backend, before torch is
    imported), comfy-aimdo's init, the modules, then DynamicVRAM (ModelPatcherDynamic) where available.
    Returns (torch, execution, nodes, dynamic_vram: bool, how: str)."""
    comfyui = Path(spec["comfyui"])
    has_dyn_flag = "--disable-dynamic-vram" in (comfyui / "comfy" / "cli_args.py").read_text()
    extra = ["--disable-dynamic-vram"] if (classic and has_dyn_flag) else []
    args = import_comfy(spec, extra)
    import comfy.cli_args
    assert "torch" not in sys.modules, "torch was imported before ComfyUI's set-up"
    if not args.cpu:
        try:
            import cuda_malloc  # noqa: F401  (sets PYTORCH_CUDA_ALLOC_CONF as main.py does)
        except Exception as e:
            rec.note(f"cuda_malloc: {first_line(e)}")
    enables = getattr(comfy.cli_args, "enables_dynamic_vram", None)
    why_classic = None
    aimdo = None
    if enables is None:
        why_classic = f"this ComfyUI ({comfyui_version(comfyui)}) has no DynamicVRAM"
    elif not enables():
        why_classic = ("--cpu (dry run)" if args.cpu else "--disable-dynamic-vram" if classic
                       else "DynamicVRAM not enabled by ComfyUI's arguments")
    else:
        try:
            import comfy_aimdo.control as aimdo
            headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
            try:
                aimdo.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
            except TypeError:
                try:
                    aimdo.init(simple_vram_headroom=headroom)
                except TypeError:
                    aimdo.init()
        except Exception as e:
            aimdo = None
            why_classic = f"comfy-aimdo unusable: {first_line(e)}"
    import torch
    import comfy.utils  # noqa: F401
    import execution
    import nodes
    import comfy.model_management as mm
    import comfy.model_patcher
    dynamic = False
    if aimdo is not None and why_classic is None:
        import comfy.memory_management
        supported = mm.is_nvidia() or (mm.is_amd() and getattr(mm, "rocm_version", (0,)) >= (7, 14))
        if not supported:
            why_classic = "DynamicVRAM needs an NVIDIA (or recent AMD) device"
        elif mm.torch_version_numeric < (2, 8):
            why_classic = "DynamicVRAM needs PyTorch 2.8 or later"
        else:
            devices = list(mm.get_all_torch_devices())
            try:
                ok = aimdo.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices)
            except TypeError:
                ok = aimdo.init_devices(d.index for d in devices)
            if ok:
                comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
                comfy.memory_management.aimdo_enabled = True
                dynamic = True
            else:
                why_classic = "comfy-aimdo did not initialise the device"
    how = (f"DynamicVRAM (ModelPatcherDynamic, comfy-aimdo {dist_version('comfy-aimdo')})" if dynamic
           else f"classic ModelPatcher ({why_classic})")
    return torch, execution, nodes, dynamic, how


def child_chain(spec: dict, rec: Record) -> None:
    import asyncio
    cfg, deadline, dry = spec["cfg"], spec["deadline"], spec["dry"]
    t_setup = time.perf_counter()
    torch, execution, nodes, dynamic, how = setup_comfy_like_main(spec, rec, classic=spec.get("classic", False))
    import comfy.model_management as mm
    import comfy.utils
    cuda = mm.get_torch_device().type == "cuda"
    env = torch_env(torch, cuda)
    env.update(comfy_env(spec))
    env["model_management"] = how
    env["dynamic_vram"] = dynamic
    try:  # travels without its compiled kernels (benchmarks/gpu_prepare.py); record whether they are there
        import comfy_kitchen.backends.cuda as ck_cuda
        env["comfy_kitchen_cuda_extension"] = bool(getattr(ck_cuda, "_EXT_AVAILABLE", False))
        if not env["comfy_kitchen_cuda_extension"]:
            env["comfy_kitchen_cuda_extension_error"] = str(getattr(ck_cuda, "_EXT_ERROR", ""))[:200]
    except Exception:
        pass
    rec.data["env"] = env
    rec.note(f"model management: {how}")
    failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if hasattr(mm, "set_cudnn_benchmark"):
        mm.set_cudnn_benchmark()
    for ct in ("LinFusionLoader", "ApplyLinFusion"):
        if ct not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"{ct} is not registered: this pack did not load as a custom node")
    env["extra_node_import_failures"] = len(failed or [])
    doc = json.loads(Path(spec["api_prompt"]).read_text())
    object_info = {}
    for ct in {n["class_type"] for n in doc["prompt"].values()}:
        try:
            object_info[ct] = {"input": nodes.NODE_CLASS_MAPPINGS[ct].INPUT_TYPES()}
        except Exception:
            pass
    prompt = chain_prompt(doc, cfg["stages"], cfg["steps"], cfg["scale"], object_info)
    stages = {nid: doc["stages"].get(nid) for nid in prompt}
    rec.data["prompt"] = prompt
    rec.data["api_prompt_source"] = {k: doc.get(k) for k in ("workflow", "frontend_version", "comfyui_version")}
    rec.data["setup_seconds"] = time.perf_counter() - t_setup
    rec.save()
    valid = asyncio.run(execution.validate_prompt(PROMPT_ID, prompt, None))
    if not valid[0]:
        rec.data["status"] = "error"
        rec.data["error"] = f"prompt invalid: {json.dumps(clean(valid[1]))[:1500]} {json.dumps(clean(valid[3]))[:1500]}"
        rec.save()
        return
    probe = ExecutionProbe(rec, prompt, stages, cuda, torch, deadline, nodes)
    comfy.utils.set_progress_bar_global_hook(probe.progress_hook)
    ex = execution.PromptExecutor(probe, cache_type=execution.CacheType.CLASSIC,
                                  cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    t = time.perf_counter()
    try:
        ex.execute(prompt, PROMPT_ID, {"client_id": "gpu-check"}, valid[2])
    finally:
        probe.close()
    rec.data["seconds"] = time.perf_counter() - t
    rec.data["events"] = probe.events
    errs = [d for e, d in probe.events if e == "execution_error"]
    if errs:
        rec.data["error"] = f"{errs[0].get('node_type')}: {errs[0].get('exception_type')}: " \
                            f"{errs[0].get('exception_message')}"
        rec.data["traceback"] = "".join(errs[0].get("traceback") or [])[-3000:]
    rec.data["run_status"] = ("success" if ex.success and not errs and not probe.interrupted_for_time
                              else "interrupted (time budget)" if probe.interrupted_for_time else "error")
    rec.data["stages"] = aggregate_stages(rec.data["nodes"], prompt)
    rec.save()


def aggregate_stages(node_recs: list, prompt: dict) -> list:
    agg: dict = {}
    for r in node_recs:
        st = r.get("stage") or "setup"
        a = agg.setdefault(st, {"stage": st, "seconds": 0.0, "nodes": [], "max_memory_allocated": None,
                                "device_used_peak": None, "rss_peak": 0})
        a["seconds"] = round(a["seconds"] + r.get("seconds", 0.0), 4)
        a["nodes"].append(r["class_type"])
        if r.get("interrupted"):
            a["cut_short"] = True
        for key in ("max_memory_allocated", "device_used_peak"):
            if r.get(key) is not None:
                a[key] = max(a[key] or 0, r[key])
        a["rss_peak"] = max(a["rss_peak"], r.get("rss_peak") or 0)
        if r["class_type"] in ("KSampler", "KSamplerAdvanced"):
            ins = prompt.get(r["node"], {}).get("inputs", {})
            a["sampler"] = {"steps": ins.get("steps"), "denoise": ins.get("denoise"),
                            "step_seconds": r.get("step_seconds")}
        if r["class_type"] in ("EmptyLatentImage", "ImageScale"):
            ins = prompt.get(r["node"], {}).get("inputs", {})
            a["size"] = [ins.get("width"), ins.get("height")]
    return list(agg.values())


# ================================================================================================ prepare (stand-ins)
def child_prepare(spec: dict, rec: Record) -> None:
    """Stand-in checkpoint (cached under the fixtures folder) and LinFusion weights, linked into the base dir."""
    base = Path(spec["base"])
    fx = Path(spec["fixtures_dir"])
    fx.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from harness import fixtures
    ckpt = fx / f"sd15-v{fixtures.FIXTURE_VERSION}.safetensors"
    if not ckpt.exists():
        t = time.perf_counter()
        tmp = ckpt.with_suffix(".partial")
        # keep the caller's PYTHONPATH: on the GPU machine the carried wheels are found through it
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), spec["comfyui"], os.environ.get("PYTHONPATH", "")) if p))
        # harness.fixtures' own entry point, through this script so that --emulate-gpu-image applies there too
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-fixture", "sd15", str(tmp)],
                       check=True, env=env, cwd=str(REPO), preexec_fn=die_with_parent)
        os.replace(tmp, ckpt)
        rec.note(f"generated {ckpt.name} ({ckpt.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s")
    else:
        rec.note(f"stand-in checkpoint reused from {ckpt}")
    dst = base / "models" / "checkpoints" / CKPT_NAME
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(ckpt)
    from harness import linfusion_fixtures
    lf_dir = base / "models" / "linfusion" / LINFUSION_NAME.split("/")[0]
    st = linfusion_fixtures.write("sd15", lf_dir, layout="folder", seed=0)
    rec.data["ckpt_path"] = str(dst)
    rec.data["linfusion_path"] = str(st)
    rec.data["status"] = "done"
    rec.save()


def install_import_blocker() -> list:
    """--emulate-gpu-image: make every installed package that the GPU machine's image lacks and that does not
    travel (benchmarks/gpu_prepare.py: GPU_IMAGE, CARRY) unimportable in this process. Returns the blocked
    top-level module names."""
    import importlib.abc
    import importlib.metadata
    sys.path.insert(0, str(BENCH))
    import gpu_prepare
    image = {gpu_prepare.norm(n) for n in gpu_prepare.GPU_IMAGE}
    # The image's packages come with their own needs; where a version here needs something new (say
    # huggingface_hub here needing httpx2), the image's version has what it needs. So the image's packages and,
    # transitively, what they require here are allowed; what travels (CARRY) must bring its own.
    todo = list(image)
    while todo:
        try:
            reqs = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            name = gpu_prepare.norm(re.split(r"[\s;<>=!~\[(]", r.strip(), 1)[0])
            if name and name not in image:
                image.add(name)
                todo.append(name)
    allowed = image | {gpu_prepare.norm(n) for n in gpu_prepare.CARRY}
    blocked = set()
    for mod, dists in importlib.metadata.packages_distributions().items():
        if gpu_prepare.norm(mod) in allowed or any(gpu_prepare.norm(d) in allowed for d in dists):
            continue
        blocked.add(mod)

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine: "
                                          "--emulate-gpu-image)", name=name)
            return None
    sys.meta_path.insert(0, Blocker())
    return sorted(blocked)



# ================================================================================================ vae section
def vae_skip_reason(last_seconds, left: float):
    """Skip the next row when the previous one (same size), with a 30 % margin, would not fit in the time left."""
    if left <= 0:
        return "the section's time is spent"
    if last_seconds is not None and last_seconds * 1.3 > left:
        return f"the previous row took {last_seconds:.0f} s and {left:.0f} s are left"
    return None


def child_vae(spec: dict, rec: Record) -> None:
    """Tiled VAE decode at the 16K stage: this pack's LinFusionVAEDecodeTiled against ComfyUI's VAE.decode_tiled
    (what VAE Decode (Tiled) calls), same tile size and overlap, for a KL VAE of the SD-1.5 and of the SD-XL kind
    (one architecture in ComfyUI: random weights, seeds 3 and 4) in the configured dtype. Time, peak device memory
    (torch.cuda.max_memory_allocated) and peak host RSS growth; distance between the two results."""
    cfg, deadline = spec["cfg"], spec["deadline"]
    import_comfy(spec)
    import gc
    import torch
    import comfy.model_management as mm
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    sys.path.insert(0, str(BENCH))
    import unet_variants
    from harness.fixtures import VAE_DDCONFIG, randomize_
    from harness.host import import_pack
    from harness.peakmem import PeakRSS

    cuda = mm.get_torch_device().type == "cuda"
    env = torch_env(torch, cuda)
    env.update(comfy_env(spec))
    rec.data["env"] = env
    rec.save()
    pack = import_pack("LinFusionGPUCheck")
    ours = pack.NODE_CLASS_MAPPINGS["LinFusionVAEDecodeTiled"]()
    dtype = getattr(torch, cfg["dtype"])
    tile, overlap = cfg["tile"], cfg["overlap"]
    for arch in cfg["archs"]:
        m = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
        randomize_(m, seed={"sd15": 3, "sdxl": 4}.get(arch, 5))
        vae = comfy.sd.VAE(sd=m.state_dict(), dtype=dtype)
        del m
        for w, h in cfg["sizes"]:
            z = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
            plan = pack.linfusion_core.vae_tiled.plan(vae.first_stage_model, tuple(z.shape), tile=tile,
                                                      overlap=overlap, dtype=vae.vae_dtype)
            outs, last = {}, None
            for impl in cfg["impls"]:
                what = f"{arch} {impl} {w}x{h}"
                why = vae_skip_reason(last, deadline - time.time())
                if why:
                    rec.skip(what, why)
                    continue
                row = {"arch": arch, "impl": impl, "size": [w, h], "latent": [w // 8, h // 8], "tile": tile,
                       "overlap": overlap, "dtype": str(vae.vae_dtype).replace("torch.", "")}
                if impl == "linfusion":
                    row["kept_bytes"] = plan["kept_bytes"]
                try:
                    rss = PeakRSS()
                    dev = unet_variants.CudaPeak(torch) if cuda else None
                    with rss:
                        if dev:
                            dev.__enter__()
                        t = time.perf_counter()
                        with torch.inference_mode():
                            if impl == "linfusion":
                                img = ours.decode({"samples": z}, vae, tile, overlap)[0]
                            else:
                                img = vae.decode_tiled(z, tile_x=tile // 8, tile_y=tile // 8,
                                                       overlap=min(overlap, tile // 4) // 8)
                        if cuda:
                            torch.cuda.synchronize()
                        row["seconds"] = time.perf_counter() - t
                        if dev:
                            dev.__exit__(None, None, None)
                            row["peak_device_bytes"] = dev.peak
                    row["peak_rss_bytes"] = rss.peak
                    row["finite"] = bool(torch.isfinite(img).all().item())
                    outs[impl] = img
                    last = row["seconds"]
                    log(f"vae {what}: {row['seconds']:8.2f} s  device +{row.get('peak_device_bytes', 0) / 2**30:.2f} "
                        f"GiB  RSS +{rss.peak / 2**30:.2f} GiB")
                except Exception as e:
                    oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
                    row["error"] = ("OOM: " if oom else "") + first_line(e)
                    row["traceback"] = traceback.format_exc()[-2000:]
                    log(f"vae {what}: {row['error']}")
                if "linfusion" in outs and "comfyui" in outs and impl == "comfyui":
                    d = (outs["linfusion"] - outs["comfyui"]).abs()
                    row["dist_to_linfusion"] = {"max": float(d.max()), "mean": float(d.mean())}
                rec.row(row)
            del outs
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        del vae
        mm.unload_all_models()
        gc.collect()


CHILDREN = {"attention": child_attention, "unet": child_unet, "chain": child_chain, "prepare": child_prepare,
            "vae": child_vae,
            "lowmem": lambda spec, rec: gpu_lowmem.child_lowmem(spec, rec, sys.modules[__name__]),
            "parallel": lambda spec, rec: gpu_parallel.child_parallel(spec, rec, sys.modules[__name__])}


def child_main(section: str, spec_path: Path, out: Path) -> int:
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for the stacks before a kill
    if os.environ.get("GPU_CHECK_STACKS"):  # debugging: every thread's stack every N seconds
        faulthandler.dump_traceback_later(float(os.environ["GPU_CHECK_STACKS"]), repeat=True)
    if section in ("unet", "chain", "lowmem", "parallel"):  # ComfyUI's own INFO lines (model loads, DynamicVRAM) go into the log
        import logging
        logging.basicConfig(level=logging.INFO, format="  [comfy] %(levelname)s %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    rec = Record(out, section)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if os.environ.get("GPU_CHECK_EMULATE_GPU_IMAGE") == "1":
        rec.data["emulated_gpu_image_blocked"] = install_import_blocker()
    try:
        CHILDREN[section](spec, rec)
        if rec.data["status"] == "running":
            rec.data["status"] = "done"
    except BaseException as e:
        rec.data["status"] = "error"
        rec.data["error"] = first_line(e)
        rec.data["traceback"] = traceback.format_exc()[-4000:]
        log(f"{section}: {rec.data['error']}\n{rec.data['traceback']}")
    rec.data["finished"] = now_iso()
    rec.data["imported_distributions"] = imported_distributions()
    rec.save()
    return 0 if rec.data["status"] == "done" else 1


# ================================================================================================ parent
def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG), so a check killed
    from outside (a test's timeout, the device call's limit) leaves no section running."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))
    except Exception:
        pass


class Child:
    def __init__(self, section: str, spec: dict, work: Path, env: dict, log_file: Path | None = None):
        self.section = section
        self.out = work / f"part-{section}{spec.get('tag', '')}.json"
        self.out.unlink(missing_ok=True)
        spec_path = work / f"spec-{section}{spec.get('tag', '')}.json"
        write_json(spec_path, spec)
        self._log = open(log_file, "w") if log_file else None
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", section,
                                      "--spec", str(spec_path), "--out", str(self.out)], env=env, cwd=str(REPO),
                                     start_new_session=True, preexec_fn=die_with_parent, stdout=self._log,
                                     stderr=subprocess.STDOUT if self._log else None)
        self.killed = None

    def read(self) -> dict:
        try:
            data = json.loads(self.out.read_text())
        except (OSError, ValueError):
            running = self.proc.poll() is None
            data = {"section": self.section, "status": "running" if running else "error", "rows": [], "notes": [],
                    "skipped": [], "error": None if running else f"no results (exit code {self.proc.returncode})"}
        if "nodes" in data and "stages" not in data:  # a chain cut short: stages from the nodes it finished
            data["stages"] = aggregate_stages(data["nodes"], data.get("prompt", {}))
        data["wall_seconds"] = round(time.time() - self.t0, 2)
        return data

    def wait(self, until: float, tick=None, every: float = 15.0) -> dict:
        """Wait for the section until ``until`` (then its stacks are printed and it is killed); ``tick(data)`` is
        called with what it has recorded so far every ``every`` seconds."""
        while True:
            try:
                self.proc.wait(timeout=max(0.1, min(every, until - time.time())))
                break
            except subprocess.TimeoutExpired:
                if time.time() < until:
                    if tick:
                        tick(self.read())
                    continue
            self.killed = f"killed at its time limit after {time.time() - self.t0:.0f} s"
            log(f"{self.section}: {self.killed}; its threads' stacks:")
            try:
                os.kill(self.proc.pid, signal.SIGUSR1)
                time.sleep(2)
            except ProcessLookupError:
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            break
        if self._log:
            self._log.close()
        data = self.read()
        data["exit_code"] = self.proc.returncode
        if self.killed:
            data["status"] = "killed"
            data["killed"] = self.killed
        return data


def child_env(dry: bool, comfyui: Path, section: str, emulate: bool = False) -> dict:
    env = dict(os.environ)
    if emulate:
        env["GPU_CHECK_EMULATE_GPU_IMAGE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # never write into the (possibly shared, read-only) ComfyUI tree
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if section == "attention":
            env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    if section == "prepare":
        env.setdefault("OMP_NUM_THREADS", "8")  # leave cores for the attention section's kernel launches
    return env


def resolve_comfyui(arg: str | None) -> Path:
    for cand in (arg, os.environ.get("COMFYUI_PATH"), CARRY / "comfyui"):
        if cand and (Path(cand) / "comfy").is_dir() and (Path(cand) / "execution.py").is_file():
            return Path(cand).resolve()
    raise SystemExit("no ComfyUI: pass --comfyui, set COMFYUI_PATH, or run benchmarks/gpu_prepare.py first")


def ensure_base(work: Path) -> Path:
    base = work / "base"
    for sub in ("custom_nodes", "models/checkpoints", "models/linfusion", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(REPO, target_is_directory=True)
    return base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU dry run at tiny sizes (what the test suite runs)")
    ap.add_argument("--comfyui", help="ComfyUI tree (default: COMFYUI_PATH, else .gpu-carry/comfyui)")
    ap.add_argument("--budget", type=float, help="seconds for the whole check (default 480 on a GPU)")
    ap.add_argument("--sections", nargs="+", default=None, choices=["attention", "unet", "lowmem", "parallel", "chain", "vae"],
                    help="default: attention unet lowmem parallel chain (on a GPU; the 16K VAE rows need ~80 GiB "
                         "of host RAM, add vae to run them), attention unet lowmem parallel vae chain (--dry)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the .json and .md go")
    ap.add_argument("--work", type=Path, help="scratch folder (base dir, images, parts; default: a temp folder)")
    ap.add_argument("--fixtures-dir", type=Path,
                    help="stand-in checkpoint cache (default: LINFUSION_FIXTURES_DIR, else <work>/fixtures)")
    ap.add_argument("--chain-steps", type=int, help="sampling steps per chain stage (default 2; dry 1)")
    ap.add_argument("--chain-stages", type=int, help="run the chain's first N stages (default all 5; dry 2)")
    ap.add_argument("--classic", action="store_true", help="chain with classic model management (no DynamicVRAM)")
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--tiny", action="store_true",
                    help="a quick GPU smoke test: the GPU mode's code paths at the dry run's tiny sizes (output "
                         "files tagged -tiny; needs a GPU: without one ComfyUI stops at import, use --dry)")
    ap.add_argument("--emulate-gpu-image", action="store_true",
                    help="make the packages the GPU machine lacks (and that do not travel) unimportable in the "
                         "sections, to check benchmarks/gpu_prepare.py's list (use with ComfyUI 0.33.0's venv)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--make-fixture", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sections is None:
        args.sections = (["attention", "unet", "lowmem", "parallel", "vae", "chain"] if args.dry
                         else ["attention", "unet", "lowmem", "parallel", "chain"])
    if args.child:
        return child_main(args.child, args.spec, args.out)
    if args.make_fixture:  # harness.fixtures.build in this process (run by the prepare section)
        if os.environ.get("GPU_CHECK_EMULATE_GPU_IMAGE") == "1":
            install_import_blocker()
        sys.path.insert(0, str(REPO))
        from harness import fixtures
        fixtures.build(args.make_fixture[0], Path(args.make_fixture[1]))
        return 0

    t_start = time.time()
    config = json.loads(json.dumps(DRY_CONFIG if (args.dry or args.tiny) else GPU_CONFIG))
    budget = args.budget or (300.0 if args.tiny else config["budget"])
    if args.tiny and not args.dry:
        args.tag = "-tiny" + args.tag
    deadline = t_start + budget
    if args.chain_steps:
        config["chain"]["steps"] = args.chain_steps
    if args.chain_stages:
        config["chain"]["stages"] = args.chain_stages
    comfyui = resolve_comfyui(args.comfyui)
    work = Path(args.work or tempfile.mkdtemp(prefix="linfusion-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = ensure_base(work)
    fixtures_dir = Path(args.fixtures_dir or os.environ.get("LINFUSION_FIXTURES_DIR") or work / "fixtures").resolve()
    common = {"dry": args.dry, "comfyui": str(comfyui), "base": str(base), "fixtures_dir": str(fixtures_dir),
              "api_prompt": str(API_PROMPT)}
    report = {"check": "LinFusion GPU check (benchmarks/gpu_check.py)", "mode": "CPU dry run" if args.dry else "GPU",
              "date": now_iso(), "budget_s": budget, "host": platform.node(), "comfyui": str(comfyui),
              "comfyui_version": comfyui_version(comfyui), "config": config, "sections": {}, "notes": []}
    if args.emulate_gpu_image:
        report["notes"].append("--emulate-gpu-image: packages the GPU machine lacks and that do not travel were "
                               "unimportable in the sections")
    if args.dry:
        report["notes"].append("CPU DRY RUN at tiny sizes: exercises the code paths; its timings are CPU timings, "
                               "not GPU results.")
        report["notes"].append("dry run: ComfyUI with --cpu --fp16-unet (UNet weights kept fp16, computed in fp32 "
                               "by ComfyUI's manual cast), to halve the memory on a shared machine")
    log(f"{report['mode']}: budget {budget:.0f} s, ComfyUI {report['comfyui_version']} at {comfyui}, work {work}")

    def share(name):
        return min(deadline, time.time() + budget * config["shares"][name])

    need_models = any(s in args.sections for s in ("unet", "lowmem", "parallel", "chain"))
    prep = None
    if need_models:  # stand-in weights, in the background while the attention section runs
        prep = Child("prepare", dict(common, deadline=deadline), work,
                     child_env(args.dry, comfyui, "prepare", args.emulate_gpu_image), log_file=work / "prepare.log")
    if "attention" in args.sections:
        log("section attention")
        report["sections"]["attention"] = Child(
            "attention", dict(common, cfg=config["attention"], deadline=share("attention")), work,
            child_env(args.dry, comfyui, "attention", args.emulate_gpu_image)).wait(share("attention") + 15)
        write_report(report, args, t_start)
    models = {}
    if prep is not None:
        p = prep.wait(deadline - 60 if not args.dry else deadline)
        report["sections"]["prepare"] = p
        if p.get("status") == "done":
            models = {"ckpt_path": p["ckpt_path"], "linfusion_path": p["linfusion_path"]}
        else:
            log(f"stand-in weights failed: {p.get('error')}\n{(work / 'prepare.log').read_text()[-3000:]}")
    for section in ("unet", "lowmem", "parallel", "vae", "chain"):
        if section not in args.sections:
            continue
        if section == "vae":  # needs no stand-in checkpoint: the VAEs are built in the section
            log("section vae")
            until = share("vae")
            report["sections"]["vae"] = Child(
                "vae", dict(common, cfg=config["vae"], deadline=until), work,
                child_env(args.dry, comfyui, "vae", args.emulate_gpu_image)).wait(until + 20)
            write_report(report, args, t_start)
            continue
        if not models:
            report["sections"][section] = {"section": section, "status": "not run",
                                           "error": "no stand-in weights (see the prepare section)"}
            continue
        left = deadline - time.time()
        if left < 20:
            report["sections"][section] = {"section": section, "status": "not run",
                                           "error": f"time budget spent ({left:.0f} s left)"}
            continue
        log(f"section {section}")
        if section in ("unet", "lowmem", "parallel"):
            until = share(section)
            report["sections"][section] = Child(
                section, dict(common, **models, cfg=config[section], deadline=until), work,
                child_env(args.dry, comfyui, section, args.emulate_gpu_image)).wait(until + 20)
            write_report(report, args, t_start)
        else:
            until = deadline - 10
            spec = dict(common, **models, cfg=config["chain"], deadline=until - 15, classic=args.classic)

            def tick(data, key="chain"):  # the chain's progress reaches $OUT even if the device call is cut off
                report["sections"][key] = data
                write_report(report, args, t_start)
            res = Child("chain", spec, work,
                        child_env(args.dry, comfyui, "chain", args.emulate_gpu_image)).wait(until, tick)
            report["sections"]["chain"] = res
            write_report(report, args, t_start)
            dyn = res.get("env", {}).get("dynamic_vram")
            if res.get("run_status") not in ("success", "interrupted (time budget)") and dyn and \
                    deadline - time.time() > 60:
                log("chain failed under DynamicVRAM; running it again with classic model management")
                report["notes"].append(f"chain under DynamicVRAM failed ({res.get('error')}); rerun classic")
                spec = dict(spec, classic=True, tag="-classic", deadline=deadline - 25)
                report["sections"]["chain_classic"] = Child(
                    "chain", spec, work, child_env(args.dry, comfyui, "chain", args.emulate_gpu_image)
                ).wait(deadline - 10, lambda d: tick(d, "chain_classic"))
    paths = write_report(report, args, t_start, final=True)
    log(f"wrote {paths[0]} and .md in {report['seconds']:.0f} s")
    return 0


def write_report(report: dict, args, t_start: float, final: bool = False) -> tuple:
    """Write the report: gpu_check_partial*.json/.md after each section (what a run cut off at the device's time
    limit still brings back), the named files at the end (and the partial ones removed)."""
    report["seconds"] = round(time.time() - t_start, 1)
    env = next((s.get("env") for s in report["sections"].values() if s.get("env", {}).get("device")), {}) or {}
    report["device"] = env.get("device")
    report["torch"] = env.get("torch")
    report["triton"] = env.get("triton")
    report["complete"] = final
    args.out_dir.mkdir(parents=True, exist_ok=True)
    partial = args.out_dir / f"gpu_check_partial{args.tag}"
    if not final:
        stem = partial
    elif args.dry:
        stem = args.out_dir / f"gpu_check_cpu-dry-run{args.tag}"
    else:
        stem = args.out_dir / f"gpu_check_{slug(report['device'] or 'unknown-device')}{args.tag}"
    write_json(stem.with_name(stem.name + ".json"), report)
    stem.with_name(stem.name + ".md").write_text(markdown(report))
    if final:
        for ext in (".json", ".md"):
            partial.with_name(partial.name + ext).unlink(missing_ok=True)
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")


# ================================================================================================ markdown
def _gib(b):
    return "–" if b in (None, "") or isinstance(b, str) else f"{b / 2**30:.2f} GiB"


def _ms(s):
    return "–" if not isinstance(s, (int, float)) else f"{s * 1e3:.3f} ms"


def _e(x):
    return "–" if not isinstance(x, (int, float)) else f"{x:.1e}"


def markdown(rep: dict) -> str:
    L = [f"# LinFusion GPU check: {rep.get('device') or '?'} ({rep['mode']})", ""]
    if not rep.get("complete", True):
        L += ["**Partial report**: written after a section; the run had not finished (or was cut off) then.", ""]
    if rep["mode"] != "GPU":
        L += ["**CPU dry run at tiny sizes.** It checks that every part of the GPU check runs; the numbers are CPU "
              "numbers and say nothing about a GPU.", ""]
    L += [f"- date: {rep['date']}; whole check {rep.get('seconds', '?')} s of a {rep['budget_s']:.0f} s budget",
          f"- torch {rep.get('torch')}, triton {rep.get('triton')}, ComfyUI {rep.get('comfyui_version')}"]
    for n in rep.get("notes", []):
        L.append(f"- {n}")
    L.append("")
    secs = rep["sections"]
    a = secs.get("attention")
    if a and a.get("status") != "not run":
        env = a.get("env", {})
        L += ["## Attention op (linfusion_core.attention)", "",
              f"{env.get('shape', '')}; status {a.get('status')}; peak bandwidth: "
              f"{env.get('peak_bandwidth_assumption', '?')}. Error: max |out − ref| / max |ref|, against "
              "linear_attention_reference in float64 where computed, else (→ torch) against the torch path.", "",
              "| tokens | dtype | impl | time (median) | GB/s | of peak | error | vs torch | calls |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in a.get("rows", []):
            if "error" in r:
                L.append(f"| {r['tokens']} | {r['dtype']} | {r['impl']} | failed: {r['error'][:120]} | | | | | |")
                continue
            frac = r.get("hbm_fraction")
            L.append(f"| {r['tokens']} | {r['dtype']} | {r['impl']} | {_ms(r.get('seconds'))} | "
                     f"{r.get('bytes_per_s', 0) / 1e9:.1f} | {'–' if frac is None else f'{frac * 100:.1f}%'} | "
                     f"{_e(r.get('rel_err'))} | {_e(r.get('rel_diff_vs_torch'))} | {r.get('reps')} |")
        L += _skips(a)
    u = secs.get("unet")
    if u and u.get("status") != "not run":
        env = u.get("env", {})
        L += ["## One SD-1.5 UNet step", "",
              f"batch {(u.get('rows') or [{}])[0].get('batch', '?')}, {env.get('unet_dtype', '?')}, "
              f"{env.get('model_management', '')}, ComfyUI attention `{env.get('comfy_attention')}`, allocator "
              f"{env.get('allocator')}; status {u.get('status')}. Peak: "
              f"{(u.get('rows') or [{}])[0].get('memory_method', '')}.", "",
              "| image | latent | config | time | vs floor | peak memory | ComfyUI formula | estimate |",
              "|---|---|---|---|---|---|---|---|"]
        floors = {tuple(r["size"]): r.get("seconds") for r in u.get("rows", []) if r["config"] == "no-self-attn"}
        for r in u.get("rows", []):
            size = f"{r['size'][0]}×{r['size'][1]}"
            lat = f"{r['latent'][0]}×{r['latent'][1]}"
            if "error" in r:
                L.append(f"| {size} | {lat} | {r['config']} | failed: {r['error'][:120]} | | | | |")
                continue
            fl = floors.get(tuple(r["size"]))
            vs_floor = f"{r['seconds'] / fl:.2f}×" if fl else "–"
            L.append(f"| {size} | {lat} | {r['config']} | {r['seconds']:.3f} s | {vs_floor} | "
                     f"{_gib(r.get('peak_bytes'))} | {_gib(r.get('comfy_formula_bytes'))} | "
                     f"{_gib(r.get('estimate_bytes'))} |")
        L += _skips(u)
    L += gpu_lowmem.markdown(secs.get("lowmem"), _gib)
    L += gpu_parallel.markdown(secs.get("parallel"), _gib)
    v = secs.get("vae")
    if v and v.get("status") != "not run":
        L += ["## Tiled VAE decode (LinFusionVAEDecodeTiled vs ComfyUI's VAE Decode (Tiled))", "",
              f"status {v.get('status')}. Same tile_size/overlap for both; peak device memory: "
              "torch.cuda.max_memory_allocated above the start; host: peak RSS growth. 'kept': the whole-image "
              "activations the exact tiling keeps (host RAM on a GPU).", "",
              "| VAE | size | impl | dtype | tile / overlap | time | peak device | peak host RSS | kept | "
              "max / mean vs LinFusion |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in v.get("rows", []):
            size = f"{r['size'][0]}×{r['size'][1]}"
            if "error" in r:
                L.append(f"| {r['arch']} | {size} | {r['impl']} | {r['dtype']} | | failed: {r['error'][:120]} "
                         "| | | | |")
                continue
            d = r.get("dist_to_linfusion")
            dist = f"{d['max']:.4f} / {d['mean']:.5f}" if d else "–"
            L.append(f"| {r['arch']} | {size} | {r['impl']} | {r['dtype']} | {r['tile']} / {r['overlap']} | "
                     f"{r['seconds']:.2f} s | {_gib(r.get('peak_device_bytes'))} | {_gib(r.get('peak_rss_bytes'))} | "
                     f"{_gib(r.get('kept_bytes'))} | {dist} |")
        L += _skips(v)
    for key in ("chain", "chain_classic"):
        c = secs.get(key)
        if not c or c.get("status") == "not run":
            continue
        env = c.get("env", {})
        L += [f"## SD-1.5 16K chain ({key})", "",
              f"{env.get('model_management', '?')}; run {c.get('run_status', c.get('status'))} in "
              f"{c.get('seconds', 0):.1f} s (set-up {c.get('setup_seconds', 0):.1f} s). Steps per stage cut to "
              f"{rep['config']['chain']['steps']} (denoise kept), stages 1–{rep['config']['chain']['stages']}, "
              f"size ×{rep['config']['chain']['scale']:g}. Allocator {env.get('allocator')}; ComfyUI attention "
              f"`{env.get('comfy_attention')}`" + ("; comfy-kitchen without its compiled CUDA extension (trimmed to "
                                                   "travel)" if env.get("comfy_kitchen_cuda_extension") is False
                                                   else "") + ".", ""]
        if c.get("error"):
            L += [f"Error: `{c['error'][:500]}`", ""]
        L += ["| stage | size | time | sampler steps (s each) | peak allocated | peak device use | peak RSS |",
              "|---|---|---|---|---|---|---|"]
        for s in c.get("stages", []):
            smp = s.get("sampler") or {}
            steps = ", ".join(f"{x:.2f}" for x in (smp.get("step_seconds") or []))
            size = "×".join(str(v) for v in s.get("size", [])) or "–"
            cut = " (cut short)" if s.get("cut_short") else ""
            L.append(f"| {s['stage'][:48]}{cut} | {size} | {s['seconds']:.2f} s | {steps or '–'} | "
                     f"{_gib(s.get('max_memory_allocated'))} | {_gib(s.get('device_used_peak'))} | "
                     f"{_gib(s.get('rss_peak'))} |")
        L += _skips(c)
    for key, s in secs.items():
        if s.get("status") not in ("done",) and key not in ("prepare",):
            L.append(f"- section {key}: {s.get('status')}" + (f" ({s.get('error')})" if s.get("error") else "")
                     + (f"; {s.get('killed')}" if s.get("killed") else ""))
    return "\n".join(L) + "\n"


def _skips(sec: dict) -> list:
    out = [""]
    for s in sec.get("skipped", []):
        out.append(f"- skipped {s['what']}: {s['why']}")
    for n in sec.get("notes", []):
        out.append(f"- {n}")
    if sec.get("killed"):
        out.append(f"- {sec['killed']}")
    out.append("")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
