"""The main job (first Quick start command): workflows/linfusion_sd15_16k.json run headless in the real ComfyUI,
scaled to this machine (full size on a GPU), once with LinFusion and once without (Apply LinFusion bypassed)
where the stock run fits; images and a report (time and peak memory per stage, both runs) written into a folder
it prints.

The UI workflow is converted into an API prompt by the real frontend in headless Chromium (harness.runner).
Real weights are used when the host's models/ folders hold them; otherwise generated stand-ins (true SD-1.5
architecture, random weights: the pictures are noise, the timings and memory are real), and it says so.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from . import env, fixtures, linfusion_fixtures, runner
from .host import ComfyServer, default_server

WORKFLOW = env.REPO / "workflows" / "linfusion_sd15_16k.json"


def pick_checkpoint(base: Path) -> tuple[str, bool]:
    """A real SD-1.5 checkpoint if the host has one (not a generated test-* file), else the generated stand-in."""
    ck = base / "models" / "checkpoints"
    real = sorted(p for p in ck.glob("*.safetensors") if not p.name.startswith("test-")
                  and not any(t in p.name.lower() for t in ("xl", "sd2", "v2-", "768")))
    if real:
        return real[0].name, True
    src = fixtures.ensure("sd15")
    dst = ck / "test-sd15.safetensors"
    if not dst.exists():
        try:
            dst.hardlink_to(src)
        except OSError:
            shutil.copyfile(src, dst)
    return dst.name, False


def pick_linfusion(base: Path) -> tuple[str, bool]:
    real = base / "models" / "linfusion" / "LinFusion-1-5" / "diffusion_pytorch_model.safetensors"
    if real.exists() and (real.parent / "config.json").exists():
        return "Yuanshi/LinFusion-1-5", True
    dest = base / "models" / "linfusion" / "standin-sd15"
    if not (dest / "diffusion_pytorch_model.safetensors").exists():
        linfusion_fixtures.write("sd15", dest, layout="folder", seed=0)
    return "standin-sd15/diffusion_pytorch_model.safetensors", False


def on_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=env.REPO / "results" / time.strftime("main-%Y%m%d-%H%M%S"))
    ap.add_argument("--scale", type=float, default=None,
                    help="size factor (default: 1 on a GPU, 1/32 on CPU, i.e. 512x256 final)")
    ap.add_argument("--steps-scale", type=float, default=None, help="steps factor (default: 1 on a GPU, 0.1 on CPU)")
    ap.add_argument("--stock-max-pixels", type=int, default=None,
                    help="run the stock (no LinFusion) graph only if its final image has at most this many "
                         "pixels (default: 8192x4096 on a GPU, always on CPU at the default scale)")
    args = ap.parse_args(argv)
    gpu = on_gpu()
    scale = args.scale if args.scale is not None else (1.0 if gpu else 1 / 32)
    steps_scale = args.steps_scale if args.steps_scale is not None else (1.0 if gpu else 0.1)
    stock_max = args.stock_max_pixels if args.stock_max_pixels is not None else \
        (8192 * 4096 if gpu else 1 << 40)
    args.out.mkdir(parents=True, exist_ok=True)
    workflow = json.loads(WORKFLOW.read_text())
    stages = runner.stage_of_nodes(workflow)
    # On a GPU the server runs without --cpu (a server of our own; host.ComfyServer always passes --cpu).
    srv = default_server()
    if gpu:
        srv = _GPUServer(base_dir=srv.base_dir, comfyui=srv.comfyui, python=srv.python)
    with srv:
        base = Path(srv.base_dir)
        ckpt, real_ckpt = pick_checkpoint(base)
        lf, real_lf = pick_linfusion(base)
        notes = []
        print(f"checkpoint: {ckpt} ({'real weights' if real_ckpt else 'GENERATED STAND-IN: true SD-1.5 architecture, random weights; images are noise'})")
        print(f"LinFusion:  {lf} ({'released weights' if real_lf else 'GENERATED STAND-IN with random weights'})")
        if not (real_ckpt and real_lf):
            notes.append("stand-in weights used (random weights, true architecture): images are noise; "
                         "time and memory are real")
        print(f"converting {WORKFLOW.name} with the real frontend (headless Chromium)")
        api_full = runner.set_models(runner.convert(srv.url, workflow), ckpt=ckpt, linfusion=lf)
        api = runner.scale_prompt(api_full, srv.object_info(), scale, steps_scale)
        final = max((n["inputs"]["width"] * n["inputs"]["height"], n["inputs"]["width"], n["inputs"]["height"])
                    for n in api.values() if n["class_type"] in ("ImageScale", "EmptyLatentImage"))
        print(f"scale {scale:g} (final {final[1]}x{final[2]}), steps x{steps_scale:g}, "
              f"{'GPU' if gpu else 'CPU'}")
        report = {"workflow": WORKFLOW.name, "checkpoint": ckpt, "real_checkpoint": real_ckpt, "linfusion": lf,
                  "real_linfusion": real_lf, "device": "gpu" if gpu else "cpu", "scale": scale,
                  "steps_scale": steps_scale, "final_size": [final[1], final[2]], "notes": notes, "runs": {}}
        runs = [("linfusion", api)]
        if final[0] <= stock_max:
            runs.append(("stock", runner.bypass_linfusion(api)))
        else:
            notes.append(f"stock run skipped: {final[1]}x{final[2]} exceeds --stock-max-pixels")
        for label, prompt in runs:
            print(f"--- {label} run")
            srv.free()
            res = runner.run_prompt(srv.url, prompt, srv.proc.pid)
            runner.collect(res, prompt, base, args.out, stages, tag=f"{label}_")
            report["runs"][label] = res
            runner.print_table(label, res)
            if res["status"] != "success":
                notes.append(f"{label} run failed: {res.get('error')}")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print("notes: " + "; ".join(notes) if notes else "")
    print(f"results in {args.out}")
    return 0 if all(r["status"] == "success" for r in report["runs"].values()) else 1


class _GPUServer(ComfyServer):
    def start(self, timeout: float = 300):
        # host.ComfyServer.start always adds --cpu; drop it by filtering the command it builds.
        import subprocess
        orig = subprocess.Popen

        def popen(cmd, *a, **kw):
            return orig([c for c in cmd if c != "--cpu"], *a, **kw)
        subprocess.Popen = popen
        try:
            return super().start(timeout)
        finally:
            subprocess.Popen = orig


if __name__ == "__main__":
    raise SystemExit(main())
