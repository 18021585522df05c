"""The whole LinFusion layer (MLPs, projections, attention) allocates nothing quadratic in the token count:
its temporary memory is a small fixed multiple of its input. Plain PyTorch, a fresh process per size."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_layer_memory", REPO / "benchmarks" / "bench_layer_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layer_temporary_memory_is_a_small_multiple_of_its_input():
    bench = _bench()
    small, large = bench.measure(65_536, python=sys.executable), bench.measure(262_144, python=sys.executable)
    for r in (small, large):
        assert r["finite"]
        # q, k, v, the two MLP hidden states and the attention output are each the input's size: about 4x.
        # One N x N fp32 score matrix per head would be 8 * N**2 * 4 bytes = 2 TiB at 262k tokens.
        assert r["temporary"] <= 5 * r["input"], r
    # Linear: 4x the tokens, about 4x the temporary memory (allocator noise allowed).
    assert large["temporary"] <= 5 * small["temporary"], (small, large)
