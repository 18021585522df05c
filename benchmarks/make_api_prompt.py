"""Write the API-format prompt of workflows/linfusion_sd15_16k.json for the GPU check (benchmarks/gpu_check.py).

The GPU machine has no browser, so the prompt is converted here, beforehand, by the real ComfyUI frontend in
headless Chromium (harness.runner.convert: app.loadGraphData + app.graphToPrompt, exactly what the Queue button
sends) and committed as benchmarks/sd15_16k_api.json. Sizes, steps and model names are left as the workflow has
them; gpu_check.py overrides model names and steps when it runs the prompt.

Run with the harness Python (it starts the host's ComfyUI server with this pack as a custom node):

    LINFUSION_PYTHON=... python benchmarks/make_api_prompt.py            # -> benchmarks/sd15_16k_api.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORKFLOW = REPO / "workflows" / "linfusion_sd15_16k.json"
OUT = REPO / "benchmarks" / "sd15_16k_api.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", type=Path, default=WORKFLOW)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from harness import runner
    from harness.frontend import Frontend
    from harness.host import default_server

    workflow = json.loads(args.workflow.read_text())
    with default_server() as srv:
        with Frontend(srv.url) as fe:
            frontend_version = fe.version
            api = fe.to_api(workflow)
        comfyui_version = srv.get("/system_stats").get("system", {}).get("comfyui_version")
    stages = runner.stage_of_nodes(workflow)
    doc = {
        "_comment": (f"API prompt of workflows/{args.workflow.name}, converted by the ComfyUI frontend "
                     f"{frontend_version} (ComfyUI {comfyui_version}) in headless Chromium by "
                     "benchmarks/make_api_prompt.py; 'stages' maps node ids to the workflow's groups."),
        "workflow": args.workflow.name,
        "frontend_version": frontend_version,
        "comfyui_version": comfyui_version,
        "stages": {nid: stages.get(nid) for nid in api},
        "prompt": api,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({len(api)} nodes, frontend {frontend_version}, ComfyUI {comfyui_version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
