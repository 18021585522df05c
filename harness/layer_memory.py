"""Peak temporary memory of one LinFusion layer (SD-1.5 level 0: C=320, 8 heads, own projections, full-rank
MLPs) against its input size. Plain PyTorch on this CPU. Used by ``benchmarks/bench_layer_memory.py`` and
``tests/test_layer_memory.py``.

``measure(tokens)`` runs one size in a fresh process (so freed pages of an earlier size cannot hide a later
peak), which is this module run from the repository root; it prints one JSON line:

    python -m harness.layer_memory --tokens 1000000 --dtype bfloat16

Temporary = growth of peak RSS during the forward pass (VmHWM reset via /proc/self/clear_refs) minus the
output tensor, which is the layer's result, not a temporary; glibc's malloc pinned (``peakmem.FIXED_MALLOC``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
C, H = 320, 8


def measure(tokens: int, dtype: str = "float32", python: str = sys.executable) -> dict:
    """Run one size in a fresh process; raises CalledProcessError if it does not fit."""
    p = subprocess.run([python, "-m", "harness.layer_memory", "--tokens", str(tokens), "--dtype", dtype],
                       cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _measure_here(tokens: int, dtype_name: str) -> dict:
    import torch

    from linfusion_core.checkpoint import LayerWeights
    from linfusion_core.layer import build_layer

    from .linfusion_fixtures import layer_tensors
    from .peakmem import PeakRSS

    dtype = getattr(torch, dtype_name)

    class Base(torch.nn.Module):  # stands in for ComfyUI's CrossAttention (only its attributes are used)
        def __init__(self):
            super().__init__()
            self.heads, self.dim_head = H, C // H
            self.to_q = torch.nn.Linear(C, C, bias=False)
            self.to_k = torch.nn.Linear(C, C, bias=False)
            self.to_v = torch.nn.Linear(C, C, bias=False)
            self.to_out = torch.nn.Sequential(torch.nn.Linear(C, C))

    t = layer_tensors(C, C, torch.Generator().manual_seed(0))
    layer = build_layer(Base().to(dtype), LayerWeights(0, C, C, True, tensors=t), dtype=dtype)
    x = torch.randn(1, tokens, C, dtype=dtype)
    with torch.inference_mode():
        layer(x[:, :4096])
        with PeakRSS() as p:
            y = layer(x)
        peak = p.peak
    out = y.numel() * y.element_size()
    return {"tokens": tokens, "dtype": dtype_name, "input": x.numel() * x.element_size(), "output": out,
            "temporary": peak - out, "finite": bool(torch.isfinite(y).all())}


def main(argv=None):
    from .peakmem import run_with_fixed_malloc
    run_with_fixed_malloc("harness.layer_memory", argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    print(json.dumps(_measure_here(args.tokens, args.dtype)))


if __name__ == "__main__":
    main()
