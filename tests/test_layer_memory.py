"""The whole LinFusion layer (MLPs, projections, attention) allocates nothing quadratic in the token count:
its temporary memory is a small fixed multiple of its input. Plain PyTorch, a fresh process per size
(harness/layer_memory.py, which benchmarks/bench_layer_memory.py runs at millions of tokens)."""
import sys

from harness.layer_memory import measure


def test_layer_temporary_memory_is_a_small_multiple_of_its_input():
    small, large = measure(65_536, python=sys.executable), measure(262_144, python=sys.executable)
    for r in (small, large):
        assert r["finite"]
        # q, k, v, the two MLP hidden states and the attention output are each the input's size: about 4x.
        # One N x N fp32 score matrix per head would be 8 * N**2 * 4 bytes = 2 TiB at 262k tokens.
        assert r["temporary"] <= 5 * r["input"], r
    # Linear: 4x the tokens, about 4x the temporary memory (allocator noise allowed).
    assert large["temporary"] <= 5 * small["temporary"], (small, large)
