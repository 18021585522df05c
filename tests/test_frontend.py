"""Every workflows/*.json in the real ComfyUI frontend (the one the host serves) in headless Chromium: it loads
with every node type registered, no missing (placeholder) nodes, widget values as stored, no console errors; it
has a note and a preview image; and the frontend's own API conversion passes the server's /prompt validation
at full size (queued behind a running prompt and removed from the queue before it could start)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness import runner
from harness.frontend import Frontend, chromium_path
from harness.graphs import Graph, checkpoint, txt2img
from harness.host import PromptError

from harness.workflow_files import WORKFLOWS, has_node, wf_inputs, workflow_family  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no chromium (python3 dev.py test installs it)")
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


@pytest.fixture(scope="module")
def fe(server):
    with Frontend(server.url) as f:
        yield f


def test_workflows_exist():
    names = {p.stem for p in WORKFLOWS}
    assert {"linfusion_sd15_16k", "linfusion_sdxl_16k", "linfusion_upscale_image"} <= names, names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_cleanly_in_the_frontend(fe, server, path):
    wf = json.loads(path.read_text())
    info = server.object_info()
    res = fe.load(wf)
    assert res["unregistered"] == [], f"missing node types: {res['unregistered']}"
    assert not [n for n in res["nodes"] if n["has_errors"] or not n["registered"]], res["nodes"]
    assert res["errors"] == [], res["errors"]
    assert len(res["nodes"]) == len(wf["nodes"])
    stored = {n["id"]: n for n in wf["nodes"]}
    for n in res["nodes"]:
        s = stored[n["id"]]
        assert s["type"] in info or s["type"] in FRONTEND_ONLY, s["type"]
        # every widget got its stored value (a shifted or dropped widget shows up here)
        assert isinstance(s.get("widgets_values", []), list)
        assert [v for _, v in n["widgets"]] == s.get("widgets_values", []), (s["type"], n["widgets"])
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and all(len(n["widgets_values"][0]) > 200 for n in notes), "a note node explains the knobs"
    previews = [path.with_suffix(ext) for ext in (".jpg", ".png") if path.with_suffix(ext).exists()]
    assert previews, f"no preview image beside {path.name}"
    from PIL import Image
    with Image.open(previews[0]) as im:
        assert im.size[0] >= 256
    # The LinFusion chain: every sampler samples a LinFusion-patched model.
    api = fe.to_api(wf)
    for n in api.values():
        if n["class_type"].startswith("KSampler"):
            assert api[str(n["inputs"]["model"][0])]["class_type"] == "ApplyLinFusion"
    assert all(n["class_type"] in info for n in api.values())


def test_sd15_16k_is_the_authors_chain(fe):
    wf = json.loads((WORKFLOWS[0].parent / "linfusion_sd15_16k.json").read_text())
    api = fe.to_api(wf)
    ks = sorted((n for n in api.values() if n["class_type"] == "KSampler"), key=lambda n: -n["inputs"]["denoise"])
    assert [(n["inputs"]["steps"], n["inputs"]["denoise"]) for n in ks] == \
        [(50, 1.0), (20, 0.4), (15, 0.3), (10, 0.2), (5, 0.1)]
    # KSampler runs `steps` of an int(steps/denoise) schedule: 20/15/10/5 of 50
    assert all(int(n["inputs"]["steps"] / n["inputs"]["denoise"]) == 50 for n in ks)
    sizes = sorted([n["inputs"]["width"], n["inputs"]["height"]] for n in api.values()
                   if n["class_type"] in ("ImageScale", "EmptyLatentImage"))
    assert sizes == [[1024, 512], [2048, 1024], [4096, 2048], [8192, 4096], [16384, 8192]]
    assert all(n["inputs"]["upscale_method"] == "bicubic" for n in api.values() if n["class_type"] == "ImageScale")
    tiled = [n for n in api.values() if n["class_type"] in ("VAEEncodeTiled", "VAEDecodeTiled")]
    assert len(tiled) == 6  # 4K, 8K and 16K stages
    final = [n for n in api.values() if n["class_type"] == "SaveImage"]
    assert len(final) == 1 and len([n for n in api.values() if n["class_type"] == "PreviewImage"]) == 4


def _queue(server):
    return server.get("/queue", timeout=180)


def _post_prompt(server, api):  # a busy server (loading a checkpoint on CPU) can answer slowly
    return server.post("/prompt", {"prompt": api, "client_id": "linfusion-validation"}, timeout=180)["prompt_id"]


def test_frontend_conversion_passes_prompt_validation(fe, server, install_checkpoint, wf_inputs):
    """Full-size prompts are validated by POST /prompt while a blocker runs, then deleted before they start."""
    ckpt = install_checkpoint("sd15")  # any installed checkpoint name passes validation; nothing is loaded
    prompts = {}
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        prompts[path.stem] = runner.set_models(fe.to_api(wf), ckpt=ckpt)
    g = Graph()
    model, clip, vae = checkpoint(g, ckpt)
    txt2img(g, model, clip, None, width=64, height=64, steps=10000, save_latent="latents/blocker")  # never ends
    blocker = server.queue_prompt(g.prompt())
    ids, refused = {}, {}
    try:
        deadline = time.time() + 120
        while not _queue(server)["queue_running"]:
            assert time.time() < deadline, "blocker did not start"
            time.sleep(0.2)
        for name, api in prompts.items():
            try:
                ids[name] = _post_prompt(server, api)
            except PromptError as e:
                refused[name] = str(e)[:1500]
        server.post("/queue", {"delete": list(ids.values())}, timeout=180)
        pending = [q[1] for q in _queue(server)["queue_pending"]]
        assert not set(ids.values()) & set(pending)
    finally:
        server.post("/queue", {"delete": list(ids.values())}, timeout=180)
        server.post("/interrupt", {}, timeout=180)
        server.wait(blocker, timeout=300)
    assert refused == {}, refused
    assert set(ids) == set(prompts)
    hist = server.get("/history?max_items=64")
    assert not set(ids.values()) & set(hist), "a full-size prompt ran"
