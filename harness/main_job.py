"""The main job (first Quick start command): a workflow run headless in the real ComfyUI, images and a short
report (time and peak memory per stage) written into a folder it prints."""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from . import env, fixtures, linfusion_fixtures
from .graphs import Graph, checkpoint, linfusion, txt2img
from .host import default_server


def pick_checkpoint(base: Path) -> tuple[str, bool]:
    """A real SD-1.5 checkpoint if the host has one, else the generated stand-in (and say so)."""
    real = sorted(p for p in (base / "models" / "checkpoints").glob("*.safetensors") if not p.name.startswith("test-"))
    if real:
        return real[0].name, True
    src = fixtures.ensure("sd15")
    dst = base / "models" / "checkpoints" / "test-sd15.safetensors"
    if not dst.exists():
        dst.hardlink_to(src)
    return dst.name, False


def pick_linfusion(base: Path) -> tuple[str, bool]:
    real = base / "models" / "linfusion" / "LinFusion-1-5" / "diffusion_pytorch_model.safetensors"
    if real.exists():
        return "Yuanshi/LinFusion-1-5", True
    dest = base / "models" / "linfusion" / "standin-sd15"
    if not (dest / "diffusion_pytorch_model.safetensors").exists():
        linfusion_fixtures.write("sd15", dest, layout="folder", seed=0)
    return "standin-sd15/diffusion_pytorch_model.safetensors", False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=env.REPO / "results" / time.strftime("main-%Y%m%d-%H%M%S"))
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with default_server() as srv:
        base = Path(srv.base_dir)
        ckpt, real_ckpt = pick_checkpoint(base)
        lf, real_lf = pick_linfusion(base)
        print(f"checkpoint: {ckpt} ({'real weights' if real_ckpt else 'GENERATED STAND-IN: true SD-1.5 architecture, random weights; images are noise'})")
        print(f"LinFusion:  {lf} ({'released weights' if real_lf else 'GENERATED STAND-IN with random weights'})")
        report = {"checkpoint": ckpt, "real_checkpoint": real_ckpt, "linfusion": lf, "real_linfusion": real_lf,
                  "stages": []}
        for label, use_lf in (("linfusion", True), ("stock", False)):
            g = Graph()
            model, clip, vae = checkpoint(g, ckpt)
            if use_lf:
                model = linfusion(g, model, lf)
            txt2img(g, model, clip, vae, width=args.width, height=args.height, steps=args.steps, prefix=f"main_{label}")
            t0 = time.time()
            entry = srv.run(g.prompt())
            dt = time.time() - t0
            for p in srv.output_images(entry):
                shutil.copy(p, args.out / p.name)
            report["stages"].append({"stage": f"txt2img {args.width}x{args.height} {label}", "seconds": round(dt, 2)})
            print(f"  {label}: {dt:.1f}s")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
