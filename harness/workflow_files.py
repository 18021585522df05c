"""The bundled workflow files (every workflows/*.json) and what the tests need to run them on the host: shared by
tests/test_workflows.py and tests/test_frontend.py, so that neither test module imports the other."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import linfusion_fixtures

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def workflow_family(wf: dict) -> str:
    names = [str(v) for n in wf["nodes"] if n["type"] == "LinFusionLoader" for v in n.get("widgets_values", [])]
    return "sdxl" if any("XL" in v for v in names) else "sd15"


def has_node(wf: dict, type_: str) -> bool:
    return any(n["type"] == type_ for n in wf["nodes"])


@pytest.fixture(scope="session")
def wf_inputs(base_dir, install_checkpoint):
    """Installs what the workflows need on the host; returns pick(family) -> (ckpt_name, linfusion_name).
    A pytest fixture (it uses conftest's ``base_dir`` and ``install_checkpoint``): import it into a test module."""
    from PIL import Image
    inp = base_dir / "input"
    inp.mkdir(parents=True, exist_ok=True)
    if not (inp / "example.png").exists():  # the LoadImage default of the upscale workflow
        Image.linear_gradient("L").resize((96, 64)).convert("RGB").save(inp / "example.png")
    if any(has_node(json.loads(p.read_text()), "ControlNetLoader") for p in WORKFLOWS):
        try:
            from .controlnet_fixtures import install_controlnet
            install_controlnet(base_dir)
        except ImportError:
            pass
    made = {}

    def pick(family: str):
        if family not in made:
            name = f"tests-workflows/{family}"
            dest = base_dir / "models" / "linfusion" / name
            if not (dest / "diffusion_pytorch_model.safetensors").exists():
                linfusion_fixtures.write(family, dest, layout="folder", seed=21)
            made[family] = (install_checkpoint(family), f"{name}/diffusion_pytorch_model.safetensors")
        return made[family]
    return pick
