"""ApplyLinFusionControlNet: LinFusion in a ControlNet's encoder, with generated ControlNets (ComfyUI's own
classes, random weights) in the original ``control_model.*`` and the diffusers layout.

In-process (CPU) tests drive ComfyUI's ControlNet objects the way the sampler does: ``copy().set_cond_hint()``,
``pre_run()``, ``load_models_gpu(get_models())``, ``get_control()``. One graph runs through the real server.

Memory method: the peak of the CPU allocator during one ControlNet forward pass, from
``torch.profiler.profile(profile_memory=True)``: the running sum of its ``[memory]`` events (allocations +,
frees -) in time order; weights are allocated before the pass, so the number is the pass's own working memory."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from harness import controlnet_fixtures, linfusion_fixtures
from harness.graphs import Graph, checkpoint
from harness.reference import layer_f64

SD15_ENCODER_LAYERS = 7  # 6 down + 1 mid


@pytest.fixture(scope="module")
def cn(pack):
    """The pack's nodes.controlnet module."""
    return pack.nodes.controlnet


@pytest.fixture(scope="module")
def lf(pack, tmp_path_factory):
    """Loaded LinFusion checkpoints: sd15 / sdxl (folder layout, config.json) and sd15-file / sdxl-file (lone file)."""
    load = pack.linfusion_core.checkpoint.load_checkpoint
    root = tmp_path_factory.mktemp("lf")
    out = {}
    for fam in ("sd15", "sdxl"):
        # SD-XL files without their own projections (the base layer's are reused): a fraction of the size
        proj = fam == "sd15"
        out[fam] = load(linfusion_fixtures.write(fam, root / f"LinFusion-{fam}", layout="folder", seed=11,
                                                 projections=proj))
        out[f"{fam}-file"] = load(linfusion_fixtures.write(fam, root / f"{fam}-single.safetensors", layout="file",
                                                           seed=11, projections=proj))
    return out


def _load(variant, layout):
    import comfy.controlnet
    return comfy.controlnet.load_controlnet(str(controlnet_fixtures.ensure_controlnet(variant, layout)))


@pytest.fixture(scope="module")
def sd15_cn(comfy_inproc):
    net = _load("sd15", "original")
    yield net
    del net


class _Model:
    """What ControlNet.pre_run needs of the base model: its model_sampling (SD's discrete EPS schedule)."""
    def __init__(self):
        import comfy.model_sampling

        class MS(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
            pass
        self.model_sampling = MS(None)


def _inputs(size, sdxl=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, size, size, generator=g)
    hint = torch.rand(1, 3, 8 * size, 8 * size, generator=g)
    cond = {"c_crossattn": torch.randn(1, 77, 2048 if sdxl else 768, generator=g)}
    if sdxl:
        cond["y"] = torch.randn(1, 2816, generator=g)
    return x, hint, cond


def _residuals(net, size=16, strength=1.0, percent=(0.0, 1.0), sdxl=False, sigma=5.0):
    """The ControlNet's residuals as ComfyUI's sampler gets them (ControlNetApplyAdvanced's copy, then get_control)."""
    import comfy.model_management
    x, hint, cond = _inputs(size, sdxl)
    c = net.copy().set_cond_hint(hint, strength, percent)  # (B, C, H, W), as ControlNetApplyAdvanced passes it
    model = _Model()
    c.pre_run(model, lambda p: model.model_sampling.percent_to_sigma(p))
    comfy.model_management.load_models_gpu(c.get_models())
    with torch.no_grad():
        out = c.get_control(x, torch.tensor([sigma]), cond, 1, {})
    c.cleanup()
    if out is None:
        return None
    return [t.clone() for key in ("output", "middle") for t in out[key] if t is not None]


def _assert_differ_and_finite(stock, patched):
    assert len(stock) == len(patched)
    assert all(torch.isfinite(t).all() for t in patched)
    assert any(not torch.equal(a, b) for a, b in zip(stock, patched))
    # the first residual (before any attention) is the same; the ones after attention blocks differ
    assert torch.equal(stock[0], patched[0])
    assert not torch.allclose(stock[-1], patched[-1])


def _attn1(net, path):
    import comfy.utils
    return comfy.utils.get_attr(net.control_model, path)


# -- the node ------------------------------------------------------------------------------------------------------

def test_node_is_registered_with_tooltips(pack):
    node = pack.NODE_CLASS_MAPPINGS["ApplyLinFusionControlNet"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ApplyLinFusionControlNet"] == "Apply LinFusion (ControlNet)"
    spec = node.INPUT_TYPES()["required"]
    assert list(spec) == ["control_net", "linfusion"]
    assert spec["control_net"][0] == "CONTROL_NET" and spec["linfusion"][0] == "LINFUSION"
    assert all(v[1].get("tooltip") for v in spec.values())
    assert node.RETURN_TYPES == ("CONTROL_NET",) and node.CATEGORY and node.DESCRIPTION


# -- SD-1.5 ControlNets in both layouts -----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", controlnet_fixtures.LAYOUTS)
def test_sd15_controlnet_patched_and_original_unchanged(cn, lf, sd15_cn, layout, pack):
    import comfy.controlnet
    net = sd15_cn if layout == "original" else _load("sd15", layout)
    stock = _residuals(net)
    patched_net, = cn.ApplyLinFusionControlNet().apply(net, lf["sd15"])

    rep = patched_net.linfusion_report
    assert len(rep.patched) == SD15_ENCODER_LAYERS and not rep.skipped, rep.summary()
    patches = patched_net.control_model_wrapped.object_patches
    assert {p for p, _, _ in rep.patched} == {k for k in patches if k.endswith(".attn1")}
    # beside each patched attn1, the block's feed-forward runs in token chunks (nothing else is patched)
    assert {p[: -len("attn1")] + "ff" for p, _, _ in rep.patched} == {k for k in patches if not k.endswith(".attn1")}
    assert all(type(patches[p[: -len("attn1")] + "ff"]).__name__ == "TokenChunkedFeedForward" for p, _, _ in rep.patched)
    assert ("input_blocks.1.1.transformer_blocks.0.attn1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
            0) in rep.patched
    assert ("middle_block.1.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0.attn1",
            15) in rep.patched

    patched = _residuals(patched_net)
    _assert_differ_and_finite(stock, patched)
    # while the patched copy is loaded, its cldm module runs LinFusion
    assert isinstance(_attn1(patched_net, rep.patched[0][0]), pack.linfusion_core.layer.LinFusionAttention)

    # the given ControlNet: same class, no patches, same outputs (ComfyUI unpatches the shared module)
    assert type(net) is comfy.controlnet.ControlNet and not net.control_model_wrapped.object_patches
    assert net.control_model_wrapped is not patched_net.control_model_wrapped
    again = _residuals(net)
    assert all(torch.equal(a, b) for a, b in zip(stock, again))
    assert not isinstance(_attn1(net, rep.patched[0][0]), pack.linfusion_core.layer.LinFusionAttention)

    # copies (what ControlNetApplyAdvanced makes) stay patched; strength and the percent range still apply
    copy = patched_net.copy()
    assert isinstance(copy, cn.LinFusionControlNet) and copy.control_model_wrapped.object_patches
    assert copy.linfusion_report is rep
    half = _residuals(patched_net, strength=0.5)
    assert all(torch.allclose(h, 0.5 * p, rtol=1e-4, atol=1e-6) for h, p in zip(half, patched))
    assert _residuals(patched_net, percent=(0.9, 1.0), sigma=14.0) is None
    if net is not sd15_cn:
        del net


@pytest.mark.server
def test_multigpu_copy_keeps_linfusion(cn, lf, sd15_cn):
    """ComfyUI 0.33's MultiGPU gives each extra device ``deepclone_multigpu(device)``: a deep copy of the control
    model under a fresh patcher. That copy must run LinFusion too, over its own modules, with the same residuals."""
    import comfy.controlnet
    if not hasattr(comfy.controlnet.ControlNet, "deepclone_multigpu"):
        pytest.skip("this ComfyUI has no multi-GPU ControlNet clones (they came with 0.33); CI runs this on 0.33.0")
    patched_net, _ = cn.apply_linfusion_controlnet(sd15_cn, lf["sd15"])
    ref = _residuals(patched_net)
    other = patched_net.deepclone_multigpu(torch.device("cpu"))
    assert other.control_model is not patched_net.control_model
    ours = {k: v for k, v in other.control_model_wrapped.object_patches.items() if k.endswith(".attn1")}
    assert len(ours) == SD15_ENCODER_LAYERS
    own_modules = {id(m) for m in other.control_model.modules()}
    assert all(id(layer._base) in own_modules and id(layer.to_q) in own_modules for layer in ours.values())
    got = _residuals(other)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    _assert_differ_and_finite(_residuals(sd15_cn), got)


@pytest.mark.parametrize("layout", controlnet_fixtures.LAYOUTS)
def test_controlnet_keeps_its_own_projections(cn, lf, layout):
    """The ControlNet's attn1 projections (trained with it) are what the patched layers use, for files with and
    without projections: nudging one of them changes the patched ControlNet's residuals."""
    net = _load("sd15", layout)  # a private copy: it is changed below
    path = "input_blocks.1.1.transformer_blocks.0.attn1"
    for which in ("sd15", "sd15-file"):
        before = _residuals(cn.apply_linfusion_controlnet(net, lf[which])[0])
        w = _attn1(net, path).to_q.weight
        with torch.no_grad():
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(w.dtype))
        after = _residuals(cn.apply_linfusion_controlnet(net, lf[which])[0])
        assert torch.equal(before[0], after[0])  # before the first attention
        assert not torch.allclose(before[1], after[1], rtol=1e-3, atol=1e-5), which
    del net


def test_patched_controlnet_layer_matches_float64_formula(cn, lf, sd15_cn):
    """A patched ControlNet layer is LinFusion's formula with the file's MLPs and the ControlNet's own projections,
    checked against the float64 reference."""
    c, rep = cn.apply_linfusion_controlnet(sd15_cn, lf["sd15"])
    path, _, index = rep.patched[2]
    layer = c.control_model_wrapped.object_patches[path]
    base = layer._base
    lw = next(lw for lw in lf["sd15"].layers if lw.index == index)
    assert lw.has_projections and not layer.linfusion.own_projections
    x = torch.randn(2, 200, lw.dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = layer(x).double()
    own = (base.to_q.weight, base.to_k.weight, base.to_v.weight, base.to_out[0].weight, base.to_out[0].bias)
    want = layer_f64(lw.tensors, x, layer.heads, own)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"ControlNet layer {path}: max |layer - float64 formula| / max |out| = {err:.2e}")
    assert err < 1e-5, err


def test_lone_linfusion_file_maps_by_unet_order(cn, lf, sd15_cn):
    c, rep = cn.apply_linfusion_controlnet(sd15_cn, lf["sd15-file"])
    c2, rep2 = cn.apply_linfusion_controlnet(sd15_cn, lf["sd15"])
    assert [(p, i) for p, _, i in rep.patched] == [(p, i) for p, _, i in rep2.patched]


def test_applying_twice_replaces(cn, lf, sd15_cn):
    once, _ = cn.apply_linfusion_controlnet(sd15_cn, lf["sd15"])
    twice, rep = cn.apply_linfusion_controlnet(once, lf["sd15"])
    path = rep.patched[0][0]
    layer = twice.control_model_wrapped.object_patches[path]
    assert layer._base is sd15_cn.control_model_wrapped.get_model_object(path)
    assert len(rep.patched) == SD15_ENCODER_LAYERS
    # a file covering fewer layers leaves no earlier LinFusion layer behind
    import dataclasses
    partial = dataclasses.replace(lf["sd15"], layers=[lw for lw in lf["sd15"].layers if lw.index != 0])
    third, rep = cn.apply_linfusion_controlnet(twice, partial)
    assert path not in third.control_model_wrapped.object_patches and rep.skipped[0][0] == path
    assert path[: -len("attn1")] + "ff" not in third.control_model_wrapped.object_patches


def test_mismatch_names_file_and_controlnet_family(cn, lf, sd15_cn, pack):
    err = pack.linfusion_core.checkpoint.LinFusionFileError
    with pytest.raises(err) as e:
        cn.ApplyLinFusionControlNet().apply(sd15_cn, lf["sdxl"])
    msg = str(e.value)
    assert str(lf["sdxl"].path) in msg and "SD-XL" in msg and "SD-1.5 ControlNet" in msg
    assert not sd15_cn.control_model_wrapped.object_patches


# -- SD-XL ControlNets whose transformer depth differs from the base UNet -------------------------------------------

@pytest.mark.parametrize("layout", controlnet_fixtures.LAYOUTS)
def test_sdxl_mid_controlnet_maps_by_name(cn, lf, pack, layout):
    net = _load("sdxl-mid", layout)
    patched_net, = cn.ApplyLinFusionControlNet().apply(net, lf["sdxl"])
    rep = patched_net.linfusion_report
    assert rep.family == "SD-XL" and not rep.skipped
    assert [(p, n) for p, n, _ in rep.patched] == [
        ("input_blocks.7.1.transformer_blocks.0.attn1", "down_blocks.2.attentions.0.transformer_blocks.0.attn1"),
        ("input_blocks.8.1.transformer_blocks.0.attn1", "down_blocks.2.attentions.1.transformer_blocks.0.attn1"),
        ("middle_block.1.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0.attn1")]
    # the weights are those of the same-named layer, wherever it sits in the file
    names = [lw.module_name for lw in lf["sdxl"].layers]
    assert [i for _, _, i in rep.patched] == [names.index(n) for _, n, _ in rep.patched]
    if layout == "original":
        stock = _residuals(net, size=16, sdxl=True)
        patched = _residuals(patched_net, size=16, sdxl=True)
        _assert_differ_and_finite(stock, patched)
        assert all(torch.equal(a, b) for a, b in zip(stock, _residuals(net, size=16, sdxl=True)))

        # a lone SD-XL file has no layer names, and a mid ControlNet does not mirror the base UNet: clear error
        with pytest.raises(pack.linfusion_core.checkpoint.LinFusionFileError, match="config.json"):
            cn.apply_linfusion_controlnet(net, lf["sdxl-file"])
        with pytest.raises(pack.linfusion_core.checkpoint.LinFusionFileError, match="SD-XL ControlNet"):
            cn.apply_linfusion_controlnet(net, lf["sd15"])

        # layers without LinFusion weights keep softmax attention, and the report says which and why
        import dataclasses
        partial = dataclasses.replace(lf["sdxl"], layers=[lw for lw in lf["sdxl"].layers
                                                         if not lw.module_name.startswith("mid_block")])
        _, rep = cn.apply_linfusion_controlnet(net, partial)
        assert len(rep.patched) == 2
        assert rep.skipped == [("middle_block.1.transformer_blocks.0.attn1",
                                "the LinFusion file has no weights for mid_block.attentions.0.transformer_blocks.0.attn1")]
        assert "kept softmax" in rep.summary()
    del net, patched_net


# -- control models without self-attention pass through -----------------------------------------------------------

def _passes_through(cn, lf, net, caplog, *words):
    with caplog.at_level(logging.WARNING, logger="LinFusion"):
        out, = cn.ApplyLinFusionControlNet().apply(net, lf["sd15"])
    assert out is net
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "LinFusion")
    assert "returned unchanged" in text and all(w in text for w in words), text


def test_sdxl_small_controlnet_passes_through(cn, lf, comfy_inproc, caplog):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    model = comfy.cldm.cldm.ControlNet(**controlnet_fixtures.controlnet_config("sdxl-small"), dtype=torch.float16,
                                       device="cpu", operations=comfy.ops.disable_weight_init)
    net = comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"))
    _passes_through(cn, lf, net, caplog, "no self-attention", "SD-XL")


def test_t2i_adapter_passes_through(cn, lf, comfy_inproc, caplog):
    import comfy.controlnet
    net = comfy.controlnet.load_controlnet_state_dict(controlnet_fixtures.t2i_adapter_state_dict())
    assert isinstance(net, comfy.controlnet.T2IAdapter)
    _passes_through(cn, lf, net, caplog, "T2I-Adapter")


def test_control_lora_passes_through(cn, lf, comfy_inproc, caplog):
    import comfy.controlnet
    net = comfy.controlnet.ControlLora({"lora_controlnet": torch.tensor([])})
    _passes_through(cn, lf, net, caplog, "Control-LoRA")


# -- memory grows linearly with the latent area ---------------------------------------------------------------------

def _step_memory(net, size):
    """(seconds, peak bytes) of one forward pass of the loaded control model (see the module docstring)."""
    import comfy.model_management
    comfy.model_management.load_models_gpu(net.get_models())
    x, hint, cond = _inputs(size)
    # oneDNN convolutions copy each conv weight into a blocked layout for the duration of the call: a constant of up
    # to 59 MiB (1280x1280x3x3 fp32) that would hide the area-dependent part at these small sizes. The plain
    # convolution path allocates only area-proportional buffers (im2col), so the peak reflects the activations.
    with torch.backends.mkldnn.flags(enabled=False), torch.no_grad(), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        net.control_model(x=x, hint=hint, timesteps=torch.tensor([500.0]), context=cond["c_crossattn"])
        seconds = time.perf_counter() - t0
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return seconds, peak


def _slopes(peaks, sizes):
    areas = [s * s for s in sizes]
    return [(peaks[i + 1] - peaks[i]) / (areas[i + 1] - areas[i]) for i in range(len(sizes) - 1)]


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_controlnet_step_memory_is_linear_in_area(cn, lf, sd15_cn):
    patched_net, _ = cn.apply_linfusion_controlnet(sd15_cn, lf["sd15"])
    sizes = (24, 36, 48)  # latent sides (192, 288, 384 px): 576, 1296, 2304 tokens at the first level
    rows = {name: [_step_memory(net, s) for s in sizes] for name, net in (("stock", sd15_cn),
                                                                         ("linfusion", patched_net))}
    for name, r in rows.items():
        print(f"\nControlNet step ({name}, profiled, oneDNN off): " + ", ".join(
            f"{s * 8}px {sec:.2f}s {pk / 2**20:.1f} MiB" for s, (sec, pk) in zip(sizes, r)))
    lin = [p for _, p in rows["linfusion"]]
    stock = [p for _, p in rows["stock"]]
    s1, s2 = _slopes(lin, sizes)
    assert lin[0] < lin[1] < lin[2]
    assert 0.8 < s2 / s1 < 1.25, (lin, s1, s2)          # linear: the same bytes per token at every size
    t1, t2 = _slopes(stock, sizes)
    assert t2 / t1 > 1.4, (stock, t1, t2)               # softmax attention's N^2 term shows already here
    assert all(p <= q * 1.02 for p, q in zip(lin, stock))


# -- through the real server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server_files(base_dir, install_checkpoint):
    """Generated files where the server's loaders look for them: {what: name}."""
    root = base_dir / "models" / "linfusion" / "tests-controlnet"
    shutil.rmtree(root, ignore_errors=True)
    linfusion_fixtures.write("sd15", root / "sd15", layout="folder", seed=11)
    return {
        "ckpt": install_checkpoint("sd15"),
        "controlnet": controlnet_fixtures.install_controlnet(base_dir, "test-cn-sd15-diffusers.safetensors",
                                                             layout="diffusers"),
        "t2i": controlnet_fixtures.install_controlnet(base_dir, "test-t2i-adapter-sd15.safetensors",
                                                      variant="t2i-adapter"),
        "linfusion": "tests-controlnet/sd15/diffusion_pytorch_model.safetensors",
    }


def _controlnet_graph(files, patch_controlnet: bool, prefix: str) -> dict:
    """SD-1.5 + LinFusion, a ControlNet (patched or stock) chained with a T2I-Adapter (passed through our node),
    both through ControlNetApplyAdvanced, then KSampler -> SaveLatent."""
    g = Graph()
    model, clip, vae = checkpoint(g, files["ckpt"])
    lf = g.out(g.add("LinFusionLoader", linfusion_name=files["linfusion"]))
    model = g.out(g.add("ApplyLinFusion", model=model, linfusion=lf))
    pos = g.out(g.add("CLIPTextEncode", text="a house on a hill", clip=clip))
    neg = g.out(g.add("CLIPTextEncode", text="", clip=clip))
    hint = g.out(g.add("EmptyImage", width=64, height=64, batch_size=1, color=0x8040C0))
    net = g.out(g.add("ControlNetLoader", control_net_name=files["controlnet"]))
    if patch_controlnet:
        net = g.out(g.add("ApplyLinFusionControlNet", control_net=net, linfusion=lf))
    a1 = g.add("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=net, image=hint, strength=1.0,
               start_percent=0.0, end_percent=1.0)
    t2i = g.out(g.add("ControlNetLoader", control_net_name=files["t2i"]))
    t2i = g.out(g.add("ApplyLinFusionControlNet", control_net=t2i, linfusion=lf))
    a2 = g.add("ControlNetApplyAdvanced", positive=g.out(a1, 0), negative=g.out(a1, 1), control_net=t2i, image=hint,
               strength=0.5, start_percent=0.0, end_percent=0.8)
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.add("KSampler", model=model, seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
               positive=g.out(a2, 0), negative=g.out(a2, 1), latent_image=g.out(lat), denoise=1.0)
    g.add("SaveLatent", samples=g.out(ks), filename_prefix=f"latents/{prefix}")
    return g.prompt()


def _latent(server, entry) -> np.ndarray:
    outs = [load_file(str(Path(server.base_dir) / "output" / item.get("subfolder", "") / item["filename"]))
            ["latent_tensor"].float().numpy()
            for node_out in entry["outputs"].values() for item in node_out.get("latents", [])]
    assert len(outs) == 1, entry["outputs"]
    return outs[0]


def test_graph_with_controlnet_apply_advanced(server, server_files):
    try:
        patched = _latent(server, server.run(_controlnet_graph(server_files, True, "cn_linfusion")))
        stock = _latent(server, server.run(_controlnet_graph(server_files, False, "cn_stock")))
    finally:
        server.free()  # the session's server stays up; give the ControlNet's memory back
    assert patched.shape == stock.shape == (1, 4, 8, 8)
    assert np.isfinite(patched).all() and np.isfinite(stock).all()
    assert not np.array_equal(patched, stock)
    log = server.log_text()
    assert "self-attention layer(s) of the SD-1.5 ControlNet use LinFusion" in log
    assert "T2I-Adapter" in log and "returned unchanged" in log
