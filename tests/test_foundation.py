"""The pack as a ComfyUI user installs it: it loads in the real ComfyUI, its nodes are served, a stock workflow
runs end to end on a generated SD-1.5 checkpoint, and the core needs no ComfyUI."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from PIL import Image

from harness import linfusion_fixtures
from harness.graphs import Graph, checkpoint, linfusion, txt2img
from harness.host import ComfyServer

REPO = Path(__file__).resolve().parent.parent
OUR_NODES = {"LinFusionLoader", "ApplyLinFusion"}


def _pack_log_problems(srv) -> list:
    """Trouble with this pack while ComfyUI loaded it: the pack's own log records (logger "LinFusion") at WARNING or
    above emitted during start-up, and ComfyUI's report that importing the pack failed. Records, not console text:
    the console format differs between hosts (newer ComfyUI prefixes every line with a coloured ``[WARNING]`` etc.,
    also its own notes that merely name the pack's folder)."""
    bad = [f"{r['name']} {r['level']}: {r['message']}"
           for r in srv.log_records(min_level=logging.WARNING, startup_only=True)]
    for line in srv.log_text().splitlines():
        low = line.lower()
        if "linfusion" in low and ("import failed" in low or "cannot import" in low):
            bad.append(line)
    return bad


def test_record_tap_runs_main_py_as_python_would(tmp_path):
    """harness/comfy_main.py (how the harness starts ComfyUI): main.py runs as __main__ with its own folder first on
    sys.path and its own argv, and exactly the "LinFusion" logger's records (children included) reach the file."""
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    (comfy / "main.py").write_text(
        "import logging, os, sys\n"
        "logging.basicConfig(level=logging.INFO, format='[%(levelname)s] %(message)s')\n"
        "assert __name__ == '__main__' and os.path.samefile(sys.path[0], os.path.dirname(__file__)), sys.path[0]\n"
        "assert sys.argv[1:] == ['--port', '1'], sys.argv\n"
        "assert not any(p.rstrip('/').endswith('harness') for p in sys.path), sys.path\n"
        "logging.getLogger('LinFusion').warning('LinFusion: careful %d', 1)\n"
        "logging.getLogger('LinFusion.sub').info('LinFusion: child')\n"
        "logging.getLogger('other').warning('LinFusion named in someone else\\'s record')\n"
        "logging.warning('root')\n")
    records = tmp_path / "rec.jsonl"
    out = subprocess.run([sys.executable, str(REPO / "harness" / "comfy_main.py"), str(records), str(comfy / "main.py"),
                          "--port", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "[WARNING] LinFusion: careful 1" in out.stderr  # the console output is untouched
    recs = [json.loads(l) for l in records.read_text().splitlines()]
    assert [(r["name"], r["level"], r["message"]) for r in recs] == [
        ("LinFusion", "WARNING", "LinFusion: careful 1"), ("LinFusion.sub", "INFO", "LinFusion: child")]


def test_pack_records_are_seen_on_this_host(server, install_checkpoint):
    """The tap works in the real server: Apply LinFusion's INFO record arrives by logger name and level, after
    start-up (so the start-up check above saw a live tap, and runtime records do not count as load problems)."""
    base = Path(server.base_dir)
    linfusion_fixtures.write("sd15", base / "models" / "linfusion" / "tests-foundation" / "sd15.safetensors",
                             layout="file", seed=3)
    g = Graph()
    model, clip, vae = checkpoint(g, install_checkpoint("sd15"))
    txt2img(g, linfusion(g, model, "tests-foundation/sd15.safetensors"), clip, steps=1,
            save_latent="latents/foundation_tap")
    server.run(g.prompt())
    applied = [r for r in server.log_records() if "sd15.safetensors -> 16 self-attention layers" in r["message"]]
    assert applied and applied[-1]["name"] == "LinFusion" and applied[-1]["level"] == "INFO", server.log_records()
    assert applied[-1]["created"] > server.ready_at
    assert not any("sd15.safetensors" in r["message"] for r in server.log_records(startup_only=True))


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
    assert _pack_log_problems(server) == [], _pack_log_problems(server)


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
        assert _pack_log_problems(srv) == []
