"""Every workflows/*.json in the real ComfyUI frontend (the one the host serves) in headless Chromium.

* As a user loads it: the file dropped on the canvas (the frontend reads it, checks it against its workflow
  schema, looks for missing node types and models, configures the graph). Nothing may come up but the marks of
  model files that are not installed here: no toast (the schema check's "Invalid workflow against zod schema"
  alert is one), no dialog, no alert(), no console error, no missing (red) node, every widget at its stored
  value. A screenshot of each loaded workflow goes to results/frontend/<frontend version>/ (git-ignored).
* Through the API path (``app.loadGraphData`` + ``graphToPrompt``): every node type registered, a note and a
  preview image, the LinFusion chain, and the frontend's own API conversion passing the server's /prompt
  validation at full size (queued behind a running prompt and removed from the queue before it could start).

Runs against whichever host the session uses (COMFYUI_PATH / LINFUSION_PYTHON / LINFUSION_HOST_DIR), so CI runs
it once per host: frontend 1.32.9 on the pinned ComfyUI 0.3.75, 1.49.6 on ComfyUI 0.33.0."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

from harness import runner
from harness.frontend import Frontend, chromium_path, load_problems
from harness.graphs import Graph, checkpoint, txt2img
from harness.host import PromptError

from harness.workflow_files import WORKFLOWS, has_node, wf_inputs, workflow_family  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no chromium (python3 dev.py test installs it)")
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
REPO = Path(__file__).resolve().parent.parent
VALIDATE = "Comfy.Validation.Workflows"  # on by default in 1.32.9, off in 1.49.6: on here, so both check the schema


@pytest.fixture(scope="module")
def fe(server):
    with Frontend(server.url) as f:
        f.close_dialogs()  # a new user's first start opens the template browser
        before = server.get("/settings")  # the host's user settings, put back as they were afterwards
        f.setting(VALIDATE, True)
        try:
            yield f
        finally:
            server.post("/settings", before)


@pytest.fixture(scope="module")
def shots(fe) -> Path:
    d = REPO / "results" / "frontend" / fe.version
    d.mkdir(parents=True, exist_ok=True)
    return d


def drop(fe, wf: dict | str, name: str, screenshot: Path | None = None) -> dict:
    """Drop a workflow (and take a screenshot of what the user sees then), then close whatever it opened, so
    the next drop starts from a quiet screen."""
    try:
        report = fe.drop(wf, name)
        if screenshot:
            fe.screenshot(screenshot)
        return report
    finally:
        fe.close_dialogs()


def test_workflows_exist():
    names = {p.stem for p in WORKFLOWS}
    assert {"linfusion_sd15_16k", "linfusion_sdxl_16k", "linfusion_upscale_image",
            "linfusion_sd15_tile_controlnet_16k"} <= names, names


# The only nulls the frontend itself writes: an input without a link, an output without links.
NULL_OK = {"nodes[].inputs[].link", "nodes[].outputs[].links"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_files_hold_no_stray_nulls(path):
    """No browser needed: the nulls an undefined-to-None round trip leaves (floatingLinks, definitions,
    extra.reroutes, outputs[].slot_index, ...) are what made the frontend's schema check reject every file."""
    found = set()

    def walk(x, at):
        if x is None:
            found.add(at)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{at}.{k}" if at else k)
        elif isinstance(x, list):
            for v in x:
                walk(v, at + "[]")

    walk(json.loads(path.read_text()), "")
    assert found <= NULL_OK, sorted(found - NULL_OK)


@pytest.mark.server
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_drops_in_without_errors(fe, server, shots, path):
    """The file as a user drags it in: nothing but missing-model marks comes up (see harness.frontend)."""
    text = path.read_text()
    report = drop(fe, text, path.name, screenshot=shots / f"{path.stem}.png")
    problems = load_problems(report, json.loads(text), server.object_info())
    assert problems == [], f"frontend {fe.version}, {path.name}:\n" + "\n".join(problems)


@pytest.mark.server
def test_the_drop_check_sees_schema_alerts_and_missing_nodes(fe, server):
    """The check above is not blind: a file with a null where the schema wants an array (what the builder used
    to write) raises the schema alert, and an unknown node type comes up as a missing node, in this frontend."""
    wf = json.loads(WORKFLOWS[0].read_text())
    info = server.object_info()
    bad = copy.deepcopy(wf)
    bad["floatingLinks"] = None
    problems = load_problems(drop(fe, bad, "null_floating_links.json"), bad, info)
    assert any("zod schema" in p for p in problems), problems
    bad = copy.deepcopy(wf)
    victim = next(n for n in bad["nodes"] if n["type"] == "PreviewImage")
    victim["type"] = "NoSuchNodeAnywhere"
    problems = load_problems(drop(fe, bad, "unknown_node_type.json"), bad, info)
    assert any("NoSuchNodeAnywhere" in p for p in problems), problems


@pytest.mark.server
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_cleanly_in_the_frontend(fe, server, path):
    wf = json.loads(path.read_text())
    info = server.object_info()
    res = fe.load(wf)
    assert res["unregistered"] == [], f"missing node types: {res['unregistered']}"
    # (node error marks are judged by the drop test, which tells a missing-model mark from an error)
    assert not [n for n in res["nodes"] if not n["registered"]], res["nodes"]
    assert res["errors"] == [], res["errors"]
    assert len(res["nodes"]) == len(wf["nodes"])
    stored = {str(n["id"]): n for n in wf["nodes"]}  # ids are strings in frontend 1.4x
    for n in res["nodes"]:
        s = stored[str(n["id"])]
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


@pytest.mark.server
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
    tiled = [n for n in api.values() if n["class_type"] in ("LinFusionVAEEncodeTiled", "LinFusionVAEDecodeTiled")]
    assert len(tiled) == 6  # 4K, 8K and 16K stages, with this pack's one-pass tiled VAE
    final = [n for n in api.values() if n["class_type"] == "SaveImage"]
    assert len(final) == 1 and len([n for n in api.values() if n["class_type"] == "PreviewImage"]) == 4


def _queue(server):
    return server.get("/queue", timeout=180)


def _post_prompt(server, api):  # a busy server (loading a checkpoint on CPU) can answer slowly
    return server.post("/prompt", {"prompt": api, "client_id": "linfusion-validation"}, timeout=180)["prompt_id"]


@pytest.mark.server
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
