"""The pack as a ComfyUI user installs it: it loads in the real ComfyUI, its nodes are served, a stock workflow
runs end to end on a generated SD-1.5 checkpoint, and the core needs no ComfyUI."""
from __future__ import annotations

import subprocess
from pathlib import Path

from PIL import Image

from harness.graphs import Graph, checkpoint, txt2img
from harness.host import ComfyServer

REPO = Path(__file__).resolve().parent.parent
OUR_NODES = {"LinFusionLoader", "ApplyLinFusion"}


def _pack_log_problems(log: str) -> list:
    """Lines of a ComfyUI log that report trouble with this pack."""
    bad = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        low = line.lower()
        mentions_us = "linfusion" in low
        if mentions_us and ("import failed" in low or "traceback" in low or "error" in low or "warning" in low
                            or "cannot import" in low):
            bad.append(line)
    return bad


def test_core_imports_without_comfyui(host):
    code = ("import sys, linfusion_core.checkpoint, linfusion_core.mapping, linfusion_core.layer, "
            "linfusion_core.attention\n"
            "import importlib.util\n"
            "spec = importlib.util.spec_from_file_location('pack', sys.argv[1], submodule_search_locations=[sys.argv[2]])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert m.NODE_CLASS_MAPPINGS == {}, m.NODE_CLASS_MAPPINGS\n"
            "leaked = sorted(k for k in sys.modules if k.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'server'))\n"
            "assert not leaked, leaked\nprint('ok')")
    out = subprocess.run([host["python"], "-c", code, str(REPO / "__init__.py"), str(REPO)], cwd=str(REPO),
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_pack_loads_without_errors(server):
    log = server.log_text()
    imported = [l for l in log.splitlines() if "seconds" in l and "ComfyUI-LinFusion" in l]
    assert imported, "the pack is not in ComfyUI's custom node import list:\n" + server.log_tail()
    assert not any("IMPORT FAILED" in l for l in imported), imported
    assert _pack_log_problems(log) == [], _pack_log_problems(log)


def test_object_info_lists_our_nodes(server):
    info = server.object_info()
    assert OUR_NODES <= set(info), sorted(k for k in info if "LinFusion" in k)
    for name in OUR_NODES:
        node = info[name]
        assert node["category"] and node["description"], name
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    released = info["LinFusionLoader"]["input"]["required"]["linfusion_name"][0]
    assert {"Yuanshi/LinFusion-1-5", "Yuanshi/LinFusion-2-1", "Yuanshi/LinFusion-XL"} <= set(released)


def test_stock_workflow_runs_on_generated_sd15(server, install_checkpoint):
    name = install_checkpoint("sd15")
    g = Graph()
    model, clip, vae = checkpoint(g, name)
    txt2img(g, model, clip, vae, width=128, height=96, steps=2, prefix="foundation_stock")
    entry = server.run(g.prompt())
    images = server.output_images(entry)
    assert len(images) == 1 and images[0].exists()
    img = Image.open(images[0])
    assert img.size == (128, 96)
    assert len(set(img.convert("L").getdata())) > 1, "the decoded image is a flat colour"
    assert "SD15" in server.log_text() or "model_type EPS" in server.log_text()


def test_pack_installs_from_git_clone(host, tmp_path):
    """A plain `git clone` into a ComfyUI's custom_nodes folder, then ComfyUI started on it."""
    base = tmp_path / "comfy-base"
    (base / "custom_nodes").mkdir(parents=True)
    dest = base / "custom_nodes" / "ComfyUI-LinFusion"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    srv = ComfyServer(base_dir=base, comfyui=Path(host["comfyui"]), python=host["python"])
    with srv:
        info = srv.object_info()
        assert OUR_NODES <= set(info)
        assert str(dest) in srv.log_text()
        assert _pack_log_problems(srv.log_text()) == []
