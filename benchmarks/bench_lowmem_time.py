"""Time of one LinFusion UNet step with and without the low-memory mode (nodes/lowmem.py), in one process on this
CPU: the generated true-size UNet (fp32), the two patched copies loaded in turn, steps alternating after a warm-up
of each; prints the median of each and their ratio (the cost the README quotes), and how far the mode's output is
from the ordinary one (relative, norm of the difference over the norm). Run with the host Python:

    python benchmarks/bench_lowmem_time.py --family sd15 --size 2048x1024 --repeats 3

The mode's pieces run at their default sizes (at this size only the parts above them run in pieces: the skips are
parked, and the first level's ResBlocks, upsamplers and transformer blocks run by bands and chunks; at 16K every
level does). --band-elements / --chunk-elements make the pieces smaller, as at 16K.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--size", default="2048x1024", help="WxH in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--band-elements", type=int, help="the mode's convolution bands (default: the pack's)")
    ap.add_argument("--chunk-elements", type=int,
                    help="the mode's token chunks of the transformer blocks (default: the pack's)")
    a = ap.parse_args(argv)
    from harness import fixtures
    from harness.host import host_info, import_pack
    from harness.step_memory import CONTEXT, linfusion_file
    sys.path.insert(0, host_info()["comfyui"])
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management as mm
    import torch

    pack = import_pack()
    if a.band_elements:
        pack.nodes.lowmem.BAND_ELEMENTS = a.band_elements
    if a.chunk_elements:
        pack.linfusion_core.layer.LinFusionAttention.chunk_elements = a.chunk_elements
    ck = pack.linfusion_core.checkpoint.load_checkpoint(linfusion_file(a.family))
    unet = fixtures.load_unet(a.family)
    models = {mode: pack.nodes.patching.apply_linfusion(unet, ck, 0, mode) for mode in ("off", "on")}
    w, h = (int(v) for v in a.size.lower().split("x"))
    ctx_dim, adm_dim = CONTEXT[a.family]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, h // 8, w // 8, generator=gen)
    kw = {"c_crossattn": torch.randn(1, 77, ctx_dim, generator=gen)}
    if adm_dim:
        kw["y"] = torch.randn(1, adm_dim, generator=gen)

    out = {}

    def step(m, mode) -> float:
        mm.load_models_gpu([m])
        options = fixtures.sampling_options(m)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out[mode] = m.model.apply_model(x, torch.tensor([1.5]), transformer_options=options, **kw).double()
        return time.perf_counter() - t0

    times = {"off": [], "on": []}
    for mode in ("off", "on"):
        step(models[mode], mode)  # warm-up
    rel = ((out["on"] - out["off"]).norm() / out["off"].norm()).item()
    for r in range(a.repeats):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            times[mode].append(step(models[mode], mode))
            print(f"{mode:3s} {times[mode][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"family": a.family, "size": a.size, "threads": torch.get_num_threads(), "times": times,
           "median_off": med["off"], "median_on": med["on"], "ratio_on_off": med["on"] / med["off"],
           "band_elements": a.band_elements, "chunk_elements": a.chunk_elements, "relative_on_off": rel}
    print(f"{a.family} {a.size}: off {med['off']:.2f} s, on {med['on']:.2f} s, on/off {res['ratio_on_off']:.3f}; "
          f"output on vs off {rel:.2e} relative")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
