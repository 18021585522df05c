"""CheckpointLoaderSimple -> LinFusionLoader -> ApplyLinFusion -> KSampler through the real server, for SD-1.5,
SD-2.1 and SD-XL checkpoints (generated, true architectures), both LinFusion layouts, fp32 / fp16 / bf16, and
every kind of bad input with the server still answering afterwards."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from harness import linfusion_fixtures
from harness.graphs import Graph, checkpoint, linfusion, txt2img
from harness.host import PromptError, default_server


@pytest.fixture(scope="module")
def lf_files(base_dir):
    """Generated LinFusion weights in models/linfusion/, in both layouts: {key: linfusion_name}."""
    root = base_dir / "models" / "linfusion" / "tests"
    shutil.rmtree(root, ignore_errors=True)
    names = {}
    for fam in ("sd15", "sd21", "sdxl"):
        linfusion_fixtures.write(fam, root / f"{fam}-folder", layout="folder", seed=11)
        names[f"{fam}-folder"] = f"tests/{fam}-folder/diffusion_pytorch_model.safetensors"
        linfusion_fixtures.write(fam, root / f"{fam}-single.safetensors", layout="file", seed=11)
        names[f"{fam}-single"] = f"tests/{fam}-single.safetensors"
    return names


def _latent(server, entry) -> np.ndarray:
    outs = []
    for node_out in entry["outputs"].values():
        for item in node_out.get("latents", []):
            p = Path(server.base_dir) / "output" / item.get("subfolder", "") / item["filename"]
            outs.append(load_file(str(p))["latent_tensor"].float().numpy())
    assert len(outs) == 1, entry["outputs"]
    return outs[0]


def _run_lf(server, ckpt, lf_name, prefix, width=64, height=64, dtype=None, **kw):
    g = Graph()
    model, clip, vae = checkpoint(g, ckpt)
    if dtype:
        model = g.out(g.add("ModelComputeDtype", model=model, dtype=dtype))
    model = linfusion(g, model, lf_name, **kw)
    txt2img(g, model, clip, vae, width=width, height=height, steps=2, prefix=prefix, save_latent=f"latents/{prefix}")
    entry = server.run(g.prompt())
    lat = _latent(server, entry)
    assert lat.shape == (1, 4, height // 8, width // 8) and np.isfinite(lat).all()
    assert all(p.exists() for p in server.output_images(entry))
    return lat


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_sd15_graph(server, install_checkpoint, lf_files, layout):
    ckpt = install_checkpoint("sd15")
    lat = _run_lf(server, ckpt, lf_files[f"sd15-{layout}"], f"sd15_{layout}")
    assert lat.std() > 0


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sd15_graph_reduced_precision_compute(server, install_checkpoint, lf_files, dtype):
    ckpt = install_checkpoint("sd15")
    fp32 = _run_lf(server, ckpt, lf_files["sd15-folder"], "sd15_ref32")
    low = _run_lf(server, ckpt, lf_files["sd15-folder"], f"sd15_{dtype}", dtype=dtype)
    # Same sampling in lower precision: close to fp32, not identical.
    assert not np.array_equal(fp32, low)
    assert np.abs(fp32 - low).max() < 0.1 * np.abs(fp32).max() + 0.05


def test_patched_and_unpatched_branch_from_one_checkpoint(server, install_checkpoint, lf_files):
    ckpt = install_checkpoint("sd15")
    # Without our nodes.
    g = Graph()
    model, clip, vae = checkpoint(g, ckpt)
    txt2img(g, model, clip, vae, seed=5, save_latent="latents/branch_plain_alone")
    alone = _latent(server, server.run(g.prompt()))
    # One checkpoint feeding both branches.
    g = Graph()
    model, clip, vae = checkpoint(g, ckpt)
    lf_model = linfusion(g, model, lf_files["sd15-single"])
    txt2img(g, lf_model, clip, vae, seed=5, save_latent="latents/branch_lf")
    txt2img(g, model, clip, vae, seed=5, save_latent="latents/branch_plain")
    entry = server.run(g.prompt())
    lats = {}
    for node_out in entry["outputs"].values():
        for item in node_out.get("latents", []):
            p = Path(server.base_dir) / "output" / item.get("subfolder", "") / item["filename"]
            lats[item["filename"].split("_0")[0]] = load_file(str(p))["latent_tensor"].numpy()
    assert set(lats) == {"branch_lf", "branch_plain"}, lats.keys()
    assert np.array_equal(lats["branch_plain"], alone), "the unpatched branch changed"
    assert not np.allclose(lats["branch_lf"], alone), "LinFusion had no effect"


def test_softmax_threshold_above_every_layer_equals_stock(server, install_checkpoint, lf_files):
    ckpt = install_checkpoint("sd15")
    g = Graph()
    model, clip, vae = checkpoint(g, ckpt)
    txt2img(g, model, clip, vae, seed=9, save_latent="latents/thr_stock")
    stock = _latent(server, server.run(g.prompt()))
    g = Graph()
    model, clip, vae = checkpoint(g, ckpt)
    txt2img(g, linfusion(g, model, lf_files["sd15-single"], softmax_below_tokens=4096), clip, vae, seed=9,
            save_latent="latents/thr_all_softmax")
    assert np.array_equal(_latent(server, server.run(g.prompt())), stock)
    g = Graph()
    model, clip, vae = checkpoint(g, ckpt)
    # 64x64 px: level 0 has 64 tokens, deeper levels 16 and 4. A threshold of 32 keeps level 0 linear.
    txt2img(g, linfusion(g, model, lf_files["sd15-single"], softmax_below_tokens=32), clip, vae, seed=9,
            save_latent="latents/thr_mixed")
    mixed = _latent(server, server.run(g.prompt()))
    assert not np.array_equal(mixed, stock)


def test_sd21_graph(server, install_checkpoint, lf_files):
    ckpt = install_checkpoint("sd21")
    for layout in ("folder", "single"):
        _run_lf(server, ckpt, lf_files[f"sd21-{layout}"], f"sd21_{layout}")
    _run_lf(server, ckpt, lf_files["sd21-folder"], "sd21_fp16", dtype="fp16")
    server.free()


# ---------------------------------------------------------------------------------------------- bad input
def _expect_error(server, prompt, *fragments):
    with pytest.raises(PromptError) as ei:
        server.run(prompt)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert server.alive()
    return msg


def test_bad_inputs_fail_in_the_node_with_clear_messages(server, install_checkpoint, lf_files, base_dir):
    ckpt = install_checkpoint("sd15")
    bad = base_dir / "models" / "linfusion" / "tests" / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    good = base_dir / "models" / "linfusion" / lf_files["sd15-single"]
    data = good.read_bytes()
    (bad / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    import pickle
    (bad / "pickled.safetensors").write_bytes(pickle.dumps({"0.to_q.weight": [0.0]}))
    t = load_file(str(good))
    from safetensors.torch import save_file
    t2 = dict(t)
    del t2["7.to_q_.3.weight"]
    save_file(t2, str(bad / "missing.safetensors"))
    t3 = dict(t)
    t3["2.to_k_.0.weight"] = t3["2.to_k_.0.weight"][:, :100].contiguous()
    save_file(t3, str(bad / "shape.safetensors"))

    def graph(lf_name):
        g = Graph()
        model, clip, vae = checkpoint(g, ckpt)
        txt2img(g, linfusion(g, model, lf_name), clip, vae, save_latent="latents/bad")
        return g.prompt()

    _expect_error(server, graph("tests/sdxl-single.safetensors"), "sdxl-single.safetensors", "SD-XL", "SD-1.5",
                  "does not fit")
    _expect_error(server, graph("tests/sd21-folder/diffusion_pytorch_model.safetensors"), "sd21-folder",
                  "SD-2.x", "SD-1.5", "heads")
    _expect_error(server, graph("tests/bad/truncated.safetensors"), "truncated.safetensors", "truncated")
    _expect_error(server, graph("tests/bad/pickled.safetensors"), "pickled.safetensors", "not a safetensors file")
    _expect_error(server, graph("tests/bad/missing.safetensors"), "missing.safetensors", "7.to_q_.3.weight")
    _expect_error(server, graph("tests/bad/shape.safetensors"), "shape.safetensors", "2.to_k_.0.weight", "shape")

    # The same checkpoint still samples unpatched afterwards, and the server keeps serving.
    g = Graph()
    model, clip, vae = checkpoint(g, ckpt)
    txt2img(g, model, clip, vae, save_latent="latents/after_errors")
    assert np.isfinite(_latent(server, server.run(g.prompt()))).all()


def test_released_repo_offline_says_which_files_go_where(install_checkpoint, base_dir, tmp_path, monkeypatch):
    """Offline for real, also where a network exists: a server of its own with HF_HUB_OFFLINE=1 and an empty
    Hugging Face cache, so huggingface_hub never tries to download and the loader must explain."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    ckpt = install_checkpoint("sd15")
    g = Graph()
    model, clip, vae = checkpoint(g, ckpt)
    txt2img(g, linfusion(g, model, "Yuanshi/LinFusion-1-5"), clip, vae, save_latent="latents/bad")
    with default_server() as srv:
        environ = Path(f"/proc/{srv.proc.pid}/environ")
        if environ.exists():  # Linux: the setting reached the server process
            assert b"HF_HUB_OFFLINE=1" in environ.read_bytes().split(b"\0")
        msg = _expect_error(srv, g.prompt(), "Yuanshi/LinFusion-1-5", "config.json",
                            "diffusion_pytorch_model.safetensors",
                            str(base_dir / "models" / "linfusion" / "LinFusion-1-5"))
    leftovers = [p.name for p in (base_dir / "models" / "linfusion").iterdir() if p.name.startswith(".LinFusion")]
    assert leftovers == [], leftovers
    assert not (base_dir / "models" / "linfusion" / "LinFusion-1-5" / "config.json").exists(), msg


def test_released_repo_already_in_place_is_used(server, install_checkpoint, base_dir):
    ckpt = install_checkpoint("sd15")
    dest = base_dir / "models" / "linfusion" / "LinFusion-1-5"
    linfusion_fixtures.write("sd15", dest, layout="folder", seed=3)
    try:
        _run_lf(server, ckpt, "Yuanshi/LinFusion-1-5", "released_in_place")
    finally:
        shutil.rmtree(dest)


# ---------------------------------------------------------------------------------------------- SD-XL
def test_sdxl_graph(install_checkpoint, lf_files):
    """SD-XL at its true size is large (2.6 B UNet parameters): a server of its own, weights kept in fp16."""
    ckpt = install_checkpoint("sdxl")
    with default_server(extra_args=["--fp16-unet", "--fp16-text-enc"]) as srv:
        for layout in ("folder", "single"):
            _run_lf(srv, ckpt, lf_files[f"sdxl-{layout}"], f"sdxl_{layout}")
        # fp16 weights computed in fp32 (ComfyUI's manual cast, which LinFusion's layers follow).
        _run_lf(srv, ckpt, lf_files["sdxl-single"], "sdxl_fp32", dtype="fp32")
