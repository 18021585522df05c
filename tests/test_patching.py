"""ApplyLinFusion below the graph level, in-process with ComfyUI's own modules and loaders and a generated
UNet with the true SD-1.5 architecture: layer map and order, the patch leaving its input untouched, exactness
against an independent float64 formula, LoRAs, other packs' attention hooks, casting and low-VRAM mode."""
from __future__ import annotations

import json

import pytest
import torch

from harness import fixtures, linfusion_fixtures
from harness.reference import layer_f64

SIGMA = torch.tensor([1.5])


@pytest.fixture(scope="module")
def ctx(comfy_inproc, pack):
    import comfy.model_management as mm
    unet = fixtures.load_unet("sd15")  # ComfyUI's real loader
    yield {"unet": unet, "patching": pack.nodes.patching, "checkpoint": pack.linfusion_core.checkpoint,
           "layer": pack.linfusion_core.layer}
    mm.unload_all_models()
    del unet
    mm.soft_empty_cache()


@pytest.fixture(scope="module")
def lf(tmp_path_factory):
    d = tmp_path_factory.mktemp("lf")
    return {
        "folder": linfusion_fixtures.write("sd15", d / "twin", layout="folder", seed=4),
        "single": linfusion_fixtures.write("sd15", d / "twin-single.safetensors", layout="file", seed=4),
        "noproj": linfusion_fixtures.write("sd15", d / "noproj.safetensors", layout="file", seed=4, projections=False),
        # ComfyUI's own order (middle block between input and output blocks): widths no longer line up.
        "mid_between": linfusion_fixtures.write("sd15", d / "mid-between.safetensors", layout="file", seed=4,
                                                order=list(range(6)) + [15] + list(range(6, 15))),
        # Mid block and first up-block layer swapped: all widths still fit, only the output can tell.
        "swapped": linfusion_fixtures.write("sd15", d / "swapped.safetensors", layout="file", seed=4,
                                            order=list(range(6)) + [15] + list(range(7, 15)) + [6]),
        "reversed": linfusion_fixtures.write("sd15", d / "reversed.safetensors", layout="file", seed=4,
                                             order=list(reversed(range(16)))),
    }


def _load(ctx, path):
    return ctx["checkpoint"].load_checkpoint(path)


def _inputs(seed=0, hw=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, hw, hw, generator=g)
    c = torch.randn(1, 77, 768, generator=g)
    return x, c


def run_unet(m, x, c):
    import comfy.model_management as mm
    mm.load_models_gpu([m])
    to = dict(m.model_options.get("transformer_options", {}))
    with torch.no_grad():
        return m.model.apply_model(x, SIGMA, c_crossattn=c, transformer_options=to).float()


def test_twin_layouts_patch_identical_layers(ctx, lf):
    a = ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["folder"]))
    b = ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["single"]))
    assert set(a.object_patches) == set(b.object_patches)
    assert len([k for k in a.object_patches if k.endswith(".attn1")]) == 16
    for key in (k for k in a.object_patches if k.endswith(".attn1")):
        sa, sb = a.object_patches[key].linfusion.state_dict(), b.object_patches[key].linfusion.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), key
    mid = a.object_patches["diffusion_model.middle_block.1.transformer_blocks.0.attn1"]
    assert mid.linfusion.to_q_[0].weight.shape == (1280, 1280)


def test_wrong_layer_order_is_detected_or_changes_the_output(ctx, lf):
    err = ctx["checkpoint"].LinFusionFileError
    with pytest.raises(err, match=r"reversed\.safetensors.*does not fit the SD-1\.5 model.*layer 0 is 1280 wide"):
        ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["reversed"]))
    with pytest.raises(err, match=r"mid-between\.safetensors.*does not fit the SD-1\.5 model.*layer 9 is 1280 wide"):
        ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["mid_between"]))
    x, c = _inputs()
    right = run_unet(ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["single"])), x, c)
    wrong = run_unet(ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["swapped"])), x, c)
    assert (right - wrong).abs().max() > 1e-3 * right.abs().max()


def test_config_names_beat_file_order(ctx, lf, tmp_path):
    """A folder whose config.json lists the layers in another order maps each entry by its name."""
    src = _load(ctx, lf["folder"])
    cfg = json.loads((lf["folder"].parent / "config.json").read_text())
    perm = list(range(6)) + [15] + list(range(6, 15))
    from safetensors.torch import load_file, save_file
    t = load_file(str(lf["folder"]))
    out = {}
    for new_i, old_i in enumerate(perm):
        for k, v in t.items():
            i, rest = k.split(".", 1)
            if int(i) == old_i:
                out[f"{new_i}.{rest}"] = v
    d = tmp_path / "permuted"
    d.mkdir()
    save_file(out, str(d / "diffusion_pytorch_model.safetensors"))
    (d / "config.json").write_text(json.dumps({"modules_list": [cfg["modules_list"][i] for i in perm]}))
    a = ctx["patching"].apply_linfusion(ctx["unet"], src)
    b = ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, d))
    for key in (k for k in a.object_patches if k.endswith(".attn1")):
        assert torch.equal(a.object_patches[key].linfusion.to_k_[0].weight, b.object_patches[key].linfusion.to_k_[0].weight)


def test_input_model_is_untouched(ctx, lf):
    unet = ctx["unet"]
    x, c = _inputs(1)
    before = run_unet(unet, x, c)
    patched = ctx["patching"].apply_linfusion(unet, _load(ctx, lf["single"]))
    assert unet.object_patches == {} and len([k for k in patched.object_patches if k.endswith(".attn1")]) == 16
    lin = run_unet(patched, x, c)
    after = run_unet(unet, x, c)
    assert torch.equal(before, after)
    assert not torch.allclose(lin, before)
    dm = unet.model.diffusion_model
    assert type(dm.input_blocks[1][1].transformer_blocks[0].attn1).__name__ == "CrossAttention"


@pytest.mark.parametrize("which", ["single", "noproj"])
def test_layer_matches_float64_formula(ctx, lf, which):
    ck = _load(ctx, lf[which])
    patched = ctx["patching"].apply_linfusion(ctx["unet"], ck)
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1"  # 640 wide, 8 heads
    layer = patched.object_patches[key]
    lw = ck.layers[2]
    base = layer._base
    basew = (base.to_q.weight, base.to_k.weight, base.to_v.weight, base.to_out[0].weight, base.to_out[0].bias)
    basew = tuple(w.double() for w in basew)
    x = torch.randn(2, 300, 640, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = layer(x).double()
    want = layer_f64(lw.tensors, x, layer.heads, None if lw.has_projections else basew)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"max |fp32 layer - float64 formula| / max |output| = {err:.2e} ({which})")
    assert err < 1e-5, err


def _lora(unet, path):
    """A LoRA touching attn1, attn2, a feed-forward (chunked by the patch) and a conv of the SD-1.5 UNet, in
    ComfyUI's generic key format."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    for key, (o, i) in {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
                        "input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 768),
                        "output_blocks.9.1.transformer_blocks.0.attn2.to_v": (320, 768),
                        "middle_block.1.proj_in": (1280, 1280),
                        "input_blocks.1.1.transformer_blocks.0.ff.net.2": (320, 1280)}.items():
        sd[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.5
        down = torch.randn(4, i, generator=g) * 0.5
        sd[f"diffusion_model.{key}.lora_down.weight"] = down if "proj_in" not in key else down[..., None, None] \
            if unet.model.diffusion_model.middle_block[1].proj_in.weight.ndim == 4 else down
    return sd


def test_lora_before_or_after_apply_gives_the_same_model(ctx, lf):
    """A LoRA on attn1, attn2, a chunked feed-forward and a conv, through real sampling runs (the path on which
    the LoRA's attn1 deltas are put on LinFusion's own projections)."""
    import comfy.sd
    unet, ck = ctx["unet"], _load(ctx, lf["single"])
    lora = _lora(unet, None)
    lf_only = _sample(ctx["patching"].apply_linfusion(unet, ck), seed=2)
    before, _ = comfy.sd.load_lora_for_models(unet, None, lora, 1.0, 0)
    before = ctx["patching"].apply_linfusion(before, ck)
    after, _ = comfy.sd.load_lora_for_models(ctx["patching"].apply_linfusion(unet, ck), None, lora, 1.0, 0)
    ya, yb = _sample(before, seed=2), _sample(after, seed=2)
    assert torch.allclose(ya, yb, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ya, lf_only, atol=1e-4)
    assert torch.equal(_sample(ctx["patching"].apply_linfusion(unet, ck), seed=2), lf_only), "LoRA leaked"


def _sample(m, seed=0, hw=8):
    """One real sampling step through ComfyUI (KSampler's path: prepare_sampling, wrappers, load_models_gpu)."""
    import comfy.sample
    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, 4, hw, hw)
    noise = torch.randn(1, 4, hw, hw, generator=g)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    return comfy.sample.sample(m, noise, 1, 1.0, "euler", "normal", cond, cond, latent, disable_pbar=True, seed=seed)


ATTN1 = "input_blocks.4.1.transformer_blocks.0.attn1"  # 640 wide, LinFusion layer 2


def _attn1_lora(scale=0.05):
    """An attn1-only LoRA (ComfyUI's generic key format) on all four projections of one layer: {key: tensor},
    and the float64 deltas it means at strength 1 ({projection weight name: delta})."""
    g = torch.Generator().manual_seed(9)
    sd, deltas = {}, {}
    for p in ("to_q", "to_k", "to_v", "to_out.0"):
        up, down = torch.randn(640, 4, generator=g) * scale, torch.randn(4, 640, generator=g) * scale
        sd[f"diffusion_model.{ATTN1}.{p}.lora_up.weight"] = up
        sd[f"diffusion_model.{ATTN1}.{p}.lora_down.weight"] = down
        deltas[f"{p}.weight"] = up.double() @ down.double()
    return sd, deltas


@pytest.mark.parametrize("order", ["lora-then-apply", "apply-then-lora"])
@pytest.mark.parametrize("which", ["single", "noproj"])
def test_attn1_lora_reaches_the_attention_that_runs(ctx, lf, order, which):
    """A LoRA's attn1 deltas reach the projections LinFusion runs (the file's own, or the base layer's), whether
    the LoRA is loaded before or after Apply LinFusion: after a real sampling run, the layer equals the float64
    formula with each delta added to the projections it uses."""
    import comfy.model_management as mm
    import comfy.sd
    unet, ck = ctx["unet"], _load(ctx, lf[which])
    lora, deltas = _attn1_lora()
    strength = 0.7
    mm.unload_all_models()  # the checkpoint's own weights, unpatched
    names = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    own = {n: unet.get_model_object(f"diffusion_model.{ATTN1}.{n}").detach().double().clone() for n in names}
    own["to_out.0.bias"] = unet.get_model_object(f"diffusion_model.{ATTN1}.to_out.0.bias").detach().double().clone()
    apply = ctx["patching"].apply_linfusion
    if order == "lora-then-apply":
        m = apply(comfy.sd.load_lora_for_models(unet, None, lora, strength, 0)[0], ck)
    else:
        m = comfy.sd.load_lora_for_models(apply(unet, ck), None, lora, strength, 0)[0]
    _sample(m)  # ComfyUI loads and patches the weights as for any KSampler run; they stay loaded
    layer = m.object_patches[f"diffusion_model.{ATTN1}"]
    lw = ck.layers[2]
    if lw.has_projections:
        tensors = {k: (v.double() + strength * deltas[k] if k in deltas else v) for k, v in lw.tensors.items()}
        basew = None
    else:
        tensors = lw.tensors
        basew = tuple(own[n] + strength * deltas[n] for n in names) + (own["to_out.0.bias"],)
    x = torch.randn(2, 300, 640, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = layer(x).double()
    want = layer_f64(tensors, x, layer.heads, basew)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"LoRA ({order}, {which}): max |layer - float64 formula with deltas| / max |out| = {err:.2e}")
    assert err < 1e-5, err
    mm.unload_all_models()


def test_attn1_lora_model_equals_file_with_deltas(ctx, lf, tmp_path):
    """Through a real sampling step of the whole UNet: file + LoRA (either order) equals the same file with each
    delta added to its own projections, within 1e-4."""
    import comfy.model_management as mm
    import comfy.sd
    from safetensors.torch import load_file, save_file
    unet = ctx["unet"]
    mm.unload_all_models()
    lora, deltas = _attn1_lora()
    t = load_file(str(lf["single"]))
    for k, d in deltas.items():
        t[f"2.{k}"] = (t[f"2.{k}"].double() + d).to(t[f"2.{k}"].dtype)
    save_file(t, str(tmp_path / "with-deltas.safetensors"))
    apply = ctx["patching"].apply_linfusion
    # the reference: the file with the deltas in it, no LoRA (the base projections do not run here)
    ref = _sample(apply(unet, _load(ctx, tmp_path / "with-deltas.safetensors")))
    for m in (apply(comfy.sd.load_lora_for_models(unet, None, lora, 1.0, 0)[0], _load(ctx, lf["single"])),
              comfy.sd.load_lora_for_models(apply(unet, _load(ctx, lf["single"])), None, lora, 1.0, 0)[0]):
        y = _sample(m)
        assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-4
    plain = _sample(apply(unet, _load(ctx, lf["single"])))
    assert not torch.allclose(plain, ref, rtol=1e-4, atol=1e-4)  # the LoRA matters at this scale


def test_attn1_patches_added_after_apply_are_reported_when_sampling(ctx, lf, caplog):
    m = ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["single"])).clone()
    m.set_model_attn1_replace(lambda q, k, v, extra: v, "input", 1)
    with caplog.at_level("WARNING", logger="LinFusion"):
        _sample(m)
    assert "attn1 replace patch" in caplog.text and "('input', 1" in caplog.text and "bypassed" in caplog.text
    import comfy.model_management as mm
    mm.unload_all_models()


def test_other_packs_attention_hooks_still_run(ctx, lf):
    patched = ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["single"]))
    calls = {"attn1_patch": 0, "attn1_output_patch": 0, "attn2_patch": 0}

    def attn1_patch(n, context, value, extra):
        calls["attn1_patch"] += 1
        return n, context, value

    def attn1_output_patch(n, extra):
        calls["attn1_output_patch"] += 1
        return n * 0.5

    def attn2_patch(n, context, value, extra):
        calls["attn2_patch"] += 1
        return n, context, value

    x, c = _inputs(3)
    plain = run_unet(patched, x, c)
    m = patched.clone()
    m.set_model_attn1_patch(attn1_patch)
    m.set_model_attn1_output_patch(attn1_output_patch)
    m.set_model_attn2_patch(attn2_patch)
    hooked = run_unet(m, x, c)
    assert calls == {"attn1_patch": 16, "attn1_output_patch": 16, "attn2_patch": 16}
    assert not torch.allclose(plain, hooked)


def test_hypertile_composes(ctx, lf):
    from comfy_extras import nodes_hypertile
    patched = ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["single"]))
    out = nodes_hypertile.HyperTile.execute(patched, 64, 2, 0, False)
    tiled = out.result[0] if hasattr(out, "result") else out[0]
    x, c = _inputs(4, hw=32)
    y_tiled, y = run_unet(tiled, x, c), run_unet(patched, x, c)
    assert torch.isfinite(y_tiled).all()
    assert not torch.allclose(y_tiled, y), "HyperTile's attn1 hooks had no effect"


def test_existing_attn1_replace_patch_is_reported(ctx, lf, caplog):
    m = ctx["unet"].clone()
    m.set_model_attn1_replace(lambda q, k, v, extra: v, "input", 1)
    with caplog.at_level("WARNING", logger="LinFusion"):
        ctx["patching"].apply_linfusion(m, _load(ctx, lf["single"]))
    assert "attn1 replace patch" in caplog.text and "bypassed" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(ctx, lf, dtype):
    """Model weights stored in fp16/bf16 (as --fp16-unet/--bf16-unet do): LinFusion's layers follow."""
    unet = fixtures.load_unet("sd15", {"dtype": dtype})
    try:
        patched = ctx["patching"].apply_linfusion(unet, _load(ctx, lf["single"]))
        layer = patched.object_patches["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1"]
        assert layer.linfusion.to_q_[0].weight.dtype == dtype
        x, c = _inputs(5)
        y = run_unet(patched, x, c)
        y32 = run_unet(ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["single"])), x, c)
        assert torch.isfinite(y).all()
        assert (y - y32).abs().max() < 0.05 * y32.abs().max() + 0.05
    finally:
        import comfy.model_management as mm
        mm.unload_all_models()
        del unet


def test_lowvram_partial_load_casts_linfusion_layers(ctx, lf):
    """ComfyUI's low-VRAM mode: weights that do not fit stay offloaded and are cast per call (comfy.ops)."""
    import comfy.model_management as mm
    patched = ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["single"]))
    x, c = _inputs(6)
    full = run_unet(patched, x, c)
    mm.unload_all_models()
    m = patched.clone()
    m.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1, load_weights=True)
    try:
        layer = m.get_model_object("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1")
        assert getattr(layer.linfusion.to_q_[0], "comfy_cast_weights", False), "LinFusion layer not in low-VRAM mode"
        to = dict(m.model_options.get("transformer_options", {}))
        with torch.no_grad():
            low = m.model.apply_model(x, SIGMA, c_crossattn=c, transformer_options=to).float()
    finally:
        m.unpatch_model()
    assert torch.allclose(full, low, atol=1e-5, rtol=1e-4)


def test_feed_forwards_are_chunked_exactly(ctx, lf):
    """Each patched block's ff runs over token chunks (linfusion_core/chunked.py) under the same weight names;
    the input model keeps ComfyUI's FeedForward, and a step with the first level's ff split into 256-token chunks
    equals the unchunked step."""
    unet = ctx["unet"]
    patched = ctx["patching"].apply_linfusion(unet, _load(ctx, lf["single"]))
    ffs = {k: v for k, v in patched.object_patches.items() if k.endswith(".ff")}
    assert len(ffs) == 16 and all(type(v).__name__ == "TokenChunkedFeedForward" for v in ffs.values())
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.ff"
    base = unet.get_model_object(key)
    assert type(base).__name__ == "FeedForward" and ffs[key]._base is base
    assert list(ffs[key].state_dict()) == list(base.state_dict())
    x, c = _inputs(3, hw=32)  # 1024 first-level tokens
    for f in ffs.values():
        f.chunk_elements = 1  # chunks of the 256-token minimum: the first level's ff runs in 4 chunks
    assert ffs[key].chunk_tokens(torch.zeros(1, 1024, 320)) == 256
    chunked = run_unet(patched, x, c)
    for f in ffs.values():
        f.chunk_elements = 1 << 40
    whole = run_unet(patched, x, c)
    assert torch.allclose(chunked, whole, rtol=1e-5, atol=1e-5), (chunked - whole).abs().max()


def test_one_definition_of_tokens(ctx, lf, pack):
    """``softmax_below_tokens`` means the same in the layer and in the memory estimate: the levels the estimate
    charges as softmax are exactly those whose layers ran softmax in a real UNet step, and it charges them."""
    memory = pack.nodes.memory
    thr = 300
    m = ctx["patching"].apply_linfusion(ctx["unet"], _load(ctx, lf["single"]), softmax_below_tokens=thr)
    seen = set()
    for key, layer in m.object_patches.items():
        if key.endswith(".attn1"):
            def spy(x, *args, _base=layer._base, **kwargs):
                seen.add(x.shape[1])
                return _base(x, *args, **kwargs)
            object.__setattr__(layer, "_base", spy)
    x, c = _inputs(0, hw=32)  # 1024 latent px: the levels see 1024, 256, 64 and 16 tokens
    run_unet(m, x, c)
    sd15 = pack.linfusion_core.families.BY_KEY["sd15"]
    levels = sd15.attention_levels
    assert seen and seen == set(memory.softmax_tokens(x.shape, thr, levels))
    linear = memory.linear_estimate(list(x.shape), memory._dtype_size(m.model), sd15)
    assert m.object_patches["memory_required"](list(x.shape)) > linear
    assert memory.softmax_tokens(x.shape, 0, levels) == []
