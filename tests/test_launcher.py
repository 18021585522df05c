"""launch.py, the headless launcher, under the real ``torchrun`` (python -m torch.distributed.run) on this machine:
two and four gloo ranks on loopback, rank 0 a real ComfyUI (main.py, this pack as a custom node) that runs an API
workflow with LinFusion Spatial Parallel. The reference is the same workflow without the node, run by the launcher
at one rank (so by the same ComfyUI, same arguments). Every process of the job must end by itself; the latents
must agree to float rounding. Nothing is mocked; the machines of a multi-machine job are loopback ranks here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from harness import linfusion_fixtures
from harness.graphs import Graph, checkpoint, linfusion, txt2img
from harness.host import free_port

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5


@pytest.fixture(scope="module")
def job(host, install_checkpoint, base_dir, tmp_path_factory):
    install_checkpoint("sd15")
    linfusion_fixtures.write("sd15", base_dir / "models" / "linfusion" / "tests" / "sd15-launch.safetensors",
                             layout="file", seed=17)
    tmp = tmp_path_factory.mktemp("launch")

    def run(nproc: int, parallel: bool, workflow: dict | None = None, timeout: float = 1200):
        prefix = f"launch_{nproc}_{uuid.uuid4().hex[:8]}"
        wf = tmp / f"{prefix}.json"
        wf.write_text(json.dumps(workflow if workflow is not None else _graph(parallel, prefix)))
        cmd = [host.get("python") or sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(REPO / "launch.py"),
               "--workflow", str(wf), "--comfyui", host["comfyui"], "--",
               "--cpu", "--base-directory", str(base_dir), "--fp16-unet",
               "--database-url", f"sqlite:///{tmp / (prefix + '.db')}"]
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        t0 = time.time()
        p = subprocess.run(cmd, cwd=str(tmp), env=env, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
        print(f"torchrun --nproc-per-node {nproc}: rc {p.returncode} in {time.time() - t0:.0f} s")
        latents = sorted((base_dir / "output" / "latents").glob(f"{prefix}_*.latent"))
        assert not _running(prefix), f"left running after torchrun returned: {_running(prefix)}"
        return p.returncode, out, (load_file(str(latents[-1]))["latent_tensor"].float().numpy() if latents else None)

    return run


def _running(marker: str) -> list:
    """Live processes whose command line holds ``marker`` (every process of a job has the workflow's or the
    database's path in it: torchrun, the ranks, ComfyUI)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                if (d / "stat").read_text().split(")")[-1].split()[0] != "Z":
                    found.append(int(d.name))
        except OSError:
            pass
    return found


def _graph(parallel: bool, prefix: str) -> dict:
    g = Graph()
    model, clip, _ = checkpoint(g, "test-sd15.safetensors")
    model = linfusion(g, model, "tests/sd15-launch.safetensors")
    if parallel:
        model = g.out(g.add("LinFusionSpatialParallel", model=model, devices="cpu,cpu"))
    # 256 px high: a latent of 32 rows, four bands of 8 (SD-1.5's alignment) at four ranks.
    txt2img(g, model, clip, width=192, height=256, steps=2, seed=4, save_latent=f"latents/{prefix}")
    return g.prompt()


def _err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def reference(job):
    rc, out, lat = job(1, parallel=False)
    assert rc == 0 and lat is not None, out[-4000:]
    assert "has no LinFusionSpatialParallel node" in out  # the launcher says so
    return lat


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.one_host)])  # 4: our code only
def test_torchrun_ranks_give_the_single_process_latent(job, reference, nproc):
    rc, out, lat = job(nproc, parallel=True)
    assert rc == 0, out[-6000:]
    assert f"joined the launcher's {nproc} ranks (gloo)" in out, out[-4000:]
    assert lat is not None, out[-4000:]
    err = _err(lat, reference)
    print(f"launcher, {nproc} gloo ranks, 2 Euler steps, SD-1.5 latent 32x24: max rel err {err:.2e}")
    assert err < TOL, err


def test_a_frontend_workflow_is_refused_with_the_file_named(job):
    ui = sorted((REPO / "workflows").glob("*.json"))[0]
    rc, out, _ = job(1, parallel=False, workflow=json.loads(ui.read_text()), timeout=300)
    assert rc != 0
    assert ".json is a workflow in the frontend's format" in out and "Export (API)" in out, out[-3000:]
