"""Peak temporary memory of one LinFusion layer (SD-1.5 level 0: C=320, 8 heads, own projections, full-rank
MLPs) against its input size, at millions of tokens. Plain PyTorch on this CPU; each size in a fresh process
(the measurement itself is harness/layer_memory.py, shared with tests/test_layer_memory.py).

    python benchmarks/bench_layer_memory.py --tokens 1000000 4000000 --dtype bfloat16

Temporary = growth of peak RSS during the forward pass (VmHWM reset via /proc/self/clear_refs) minus the
output tensor, which is the layer's result, not a temporary.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.layer_memory import measure  # noqa: E402


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
