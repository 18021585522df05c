"""Peak temporary memory of one LinFusion layer (SD-1.5 level 0: C=320, 8 heads, own projections, full-rank
MLPs) against its input size, at millions of tokens. Plain PyTorch on this CPU; each size in a fresh process.

    python benchmarks/bench_layer_memory.py --tokens 1000000 4000000 --dtype bf16

Temporary = growth of peak RSS during the forward pass (VmHWM reset via /proc/self/clear_refs) minus the
output tensor, which is the layer's result, not a temporary.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from harness.linfusion_fixtures import layer_tensors
from linfusion_core.checkpoint import LayerWeights
from linfusion_core.layer import build_layer
N, dtype = int(sys.argv[2]), getattr(torch, sys.argv[3])
C, H = 320, 8
class Base(torch.nn.Module):  # stands in for ComfyUI's CrossAttention (only its attributes are used)
    def __init__(self):
        super().__init__()
        self.heads, self.dim_head = H, C // H
        self.to_q = torch.nn.Linear(C, C, bias=False); self.to_k = torch.nn.Linear(C, C, bias=False)
        self.to_v = torch.nn.Linear(C, C, bias=False); self.to_out = torch.nn.Sequential(torch.nn.Linear(C, C))
t = layer_tensors(C, C, torch.Generator().manual_seed(0))
layer = build_layer(Base().to(dtype), LayerWeights(0, C, C, True, tensors=t), dtype=dtype)
x = torch.randn(1, N, C, dtype=dtype)
from harness.peakmem import PeakRSS
with torch.inference_mode():
    layer(x[:, :4096])
    with PeakRSS() as p:
        y = layer(x)
    peak = p.peak
inp = x.numel() * x.element_size()
print(json.dumps({"tokens": N, "dtype": sys.argv[3], "input": inp, "output": y.numel() * y.element_size(),
                  "temporary": peak - y.numel() * y.element_size(), "finite": bool(torch.isfinite(y).all())}))
'''


def measure(tokens: int, dtype: str = "float32", python: str = sys.executable) -> dict:
    """Run one size in a fresh process; raises CalledProcessError if it does not fit."""
    p = subprocess.run([python, "-c", CHILD, str(REPO), str(tokens), dtype], capture_output=True, text=True,
                       check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    rows = ["| tokens | dtype | input | temporary | temporary / input |", "|---|---|---|---|---|"]
    for n in args.tokens:
        try:
            r = measure(n, args.dtype)
        except subprocess.CalledProcessError as e:
            rows.append(f"| {n:,} | {args.dtype} | – | did not fit ({(e.stderr or '').strip()[-80:]}) | |")
            continue
        rows.append(f"| {n:,} | {args.dtype} | {r['input'] / 2**20:.0f} MiB | {r['temporary'] / 2**20:.0f} MiB | "
                    f"{r['temporary'] / r['input']:.2f}× |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
