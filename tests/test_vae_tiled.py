"""One-pass tiled VAE (linfusion_core/vae_tiled.py, nodes/vae.py) against ComfyUI's own untiled VAE.

The reference is ComfyUI's first_stage_model.decode/encode on the whole image. Tiled and untiled differ only in the
mid-block attention (computed per attention tile), so the exactness tests swap that attention on both sides for
the same op (identity, or a local 3x3 convolution), or make one attention tile cover the whole latent; then every
convolution, GroupNorm, upsampler and downsampler must give the untiled result to fp32 tolerance, with tiles far
smaller than the image (ragged last tiles included). Random weights, GroupNorm affine parameters randomised too.
SD-1.x, SD-2.x and SD-XL VAEs are one architecture in ComfyUI (AutoencoderKL, ch 128, mult 1-2-4-4, quant convs);
the second architecture is ComfyUI's AutoencodingEngine without quant convs and with 16 latent channels.
"""
from __future__ import annotations

import copy

import pytest
import torch

from harness.fixtures import VAE_DDCONFIG, randomize_

TOL = 2e-5  # fp32, relative to the largest output value


def _randomize_norms(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))


def _model(arch, seed=3):
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine
    if arch == "kl":
        m = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    else:
        cfg = dict(VAE_DDCONFIG, z_channels=16)
        reg = {"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"}
        m = AutoencodingEngine(
            regularizer_config=reg,
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": cfg},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": cfg})
    m = m.eval()
    randomize_(m, seed=seed)
    _randomize_norms(m, seed + 1)
    return m


class _LocalOp(torch.nn.Module):
    """A stand-in for the attention with a 3x3 receptive field: x + conv(x)."""

    def __init__(self, c, seed):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * (9 * c) ** -0.5)
            self.conv.bias.zero_()

    def forward(self, x):
        return x + self.conv(x)


def _swap_attention(m, kind):
    for net in (m.decoder, m.encoder):
        c = net.mid.attn_1.in_channels
        net.mid.attn_1 = torch.nn.Identity() if kind == "identity" else _LocalOp(c, 11)
    return m


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def vt(comfy_inproc, pack):
    return pack.linfusion_core.vae_tiled


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merged_statistics_equal_float64_whole_map(vt, dtype, layout):
    """The GroupNorm statistics merged over ragged tiles (strided views, as the sweeps pass them; NCHW maps as on a
    GPU, channels-last maps as on a CPU) equal torch's float64 variance and mean of the whole map, per group, for a
    map far from zero mean (where a one-pass sum of squares in float32 would lose the variance)."""
    g = torch.Generator().manual_seed(0)
    C, groups, H, W = 64, 32, 37, 53
    offset = 40 * torch.randn(1, C, 1, 1, generator=g)
    x = (offset + torch.randn(1, C, H, W, generator=g) * (0.05 + torch.rand(1, C, 1, 1, generator=g))).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
        assert x[:, :, 16:32, 20:40].stride(1) == 1  # the tiles below take the channels-last path
    st = vt._Stats(groups, "cpu", planning=False)
    for y0 in range(0, H, 16):
        for x0 in range(0, W, 20):
            st.add(x[:, :, y0:y0 + 16, x0:x0 + 20])
    ref_var, ref_mean = torch.var_mean(x.double().contiguous().view(groups, -1), dim=1, unbiased=False)
    var = st.m2 / st.n
    assert st.n == C // groups * H * W
    assert ((st.mean - ref_mean).abs() / ref_mean.abs()).max() < 1e-6
    assert ((var - ref_var).abs() / ref_var).max() < 1e-5


@pytest.mark.parametrize("arch", ["kl", "engine16"])
@pytest.mark.parametrize("attn", ["identity", "local"])
def test_decode_equals_untiled_apart_from_attention(vt, arch, attn):
    m = _swap_attention(_model(arch), attn)
    zc = 4 if arch == "kl" else 16
    z = torch.randn(2 if attn == "local" else 1, zc, 12, 20, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = m.decode(z)
        ticks = []
        out = vt.decode(m, z, tile=16, overlap=16, progress=ticks.append)
    assert out.shape == ref.shape == (z.shape[0], 3, 96, 160)
    assert _err(out, ref) < TOL
    if arch == "kl" and attn == "identity":  # the variant that stores the last upsampled map
        with torch.inference_mode():
            assert _err(vt.decode(m, z, tile=16, overlap=16, keep_upsampled=True), ref) < TOL
    plan = vt.plan(m, tuple(z.shape), what="decode", tile=16, overlap=16)
    assert ticks == list(range(1, plan["steps"] + 1)) and plan["steps"] > 100  # many tiles, counted right


@pytest.mark.parametrize("arch", ["kl", "engine16"])
@pytest.mark.parametrize("attn", ["identity", "local"])
def test_encode_equals_untiled_apart_from_attention(vt, arch, attn):
    m = _swap_attention(_model(arch), attn)
    x = torch.rand(1, 3, 88, 168, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = m.encode(x * 2 - 1)
        out = vt.encode(m, x, tile=16, overlap=16, process_input=lambda t: t * 2 - 1)
    assert out.shape == ref.shape == (1, 4 if arch == "kl" else 16, 11, 21)
    assert _err(out, ref) < TOL


def test_real_attention_in_one_attention_tile_equals_untiled(vt):
    """Small conv tiles, one attention tile over the whole latent: the softmax attention path itself is exact."""
    m = _model("kl")
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 12, 10, generator=g)
    x = torch.rand(1, 3, 96, 80, generator=g)
    with torch.inference_mode():
        assert _err(vt.decode(m, z, tile=16, attention_tile=4096), m.decode(z)) < TOL
        assert _err(vt.encode(m, x, tile=16, attention_tile=4096, process_input=lambda t: t * 2 - 1),
                    m.encode(x * 2 - 1)) < TOL


def test_default_attention_window_is_twice_the_tile(vt):
    """The attention window defaults to 2 x tile: with 64-pixel tiles and no overlap a 128x128 image is one attention
    window (untiled result); a 64-pixel window gives something else."""
    m = _model("kl")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(14))
    with torch.inference_mode():
        ref = m.decode(z)
        assert _err(vt.decode(m, z, tile=64, overlap=0), ref) < TOL
        assert _err(vt.decode(m, z, tile=64, overlap=0, attention_tile=64), ref) > 100 * TOL


def test_closer_to_untiled_than_comfyui_three_pass(vt, comfy_inproc):
    """With attention per tile, at ComfyUI's tile geometry (tile 16 latents, overlap 4): the distance to the untiled
    decode is smaller than that of ComfyUI's VAE.decode_tiled_ (three tilings averaged, per-tile GroupNorm)."""
    import comfy.sd
    m = _model("kl", seed=5)
    vae = comfy.sd.VAE(sd=m.state_dict())
    z = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = vae.first_stage_model.decode(z)
        ours = vt.decode(vae.first_stage_model, z, tile=128, overlap=32, attention_tile=128)
        comfy3 = vae.decode_tiled_(z, tile_x=16, tile_y=16, overlap=4) * 2 - 1  # undo process_output's (x+1)/2
    ref_c = ref.clamp(-1, 1)  # process_output clamps; compare in the clamped range
    d_ours = (ours.clamp(-1, 1) - ref_c).abs()
    d_comfy = (comfy3 - ref_c).abs()
    assert d_ours.mean() < d_comfy.mean() and d_ours.max() < d_comfy.max(), (d_ours.mean(), d_comfy.mean())


def test_bf16_close_to_untiled_bf16(vt):
    m = _swap_attention(_model("kl"), "identity").to(torch.bfloat16)
    z = torch.randn(1, 4, 2, 4, generator=torch.Generator().manual_seed(6))  # 16-bit convolutions crawl on a CPU
    with torch.inference_mode():
        ref = m.decode(z.to(torch.bfloat16)).float()
        out = vt.decode(m, z, tile=16)
        ref32 = _swap_attention(_model("kl"), "identity").decode(z)
    assert out.dtype == torch.float32
    # bf16 rounding differs between the two orders of work; both are as far from fp32 as each other
    assert _err(out, ref32) < 3 * _err(ref, ref32) + 1e-3


def test_fp16_overflow_reruns_in_higher_precision(vt):
    """Activations beyond fp16's range (what the SD-XL VAE does in fp16) restart the decode in a wider dtype
    (fp32 on the CPU) on a cast copy; the caller's module is left in fp16."""
    m = _swap_attention(_model("kl"), "identity")
    with torch.no_grad():
        m.post_quant_conv.weight.mul_(3e3)  # weights still within fp16, conv_in's output far beyond 65504
        m.decoder.conv_in.weight.mul_(3e3)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = m.decode(z)
        m16 = copy.deepcopy(m).half()
        assert not torch.isfinite(m16.decode(z.half())).all()  # the untiled fp16 decode overflows
        seen = []
        out = vt.decode(m16, z, tile=16, on_upcast=seen.append)
    assert seen == [torch.float32] and m16.decoder.conv_in.weight.dtype == torch.float16
    ref_cast = copy.deepcopy(m16).float().decode(z)  # the fp16 weights, run in fp32
    assert torch.isfinite(out).all() and _err(out, ref_cast) < TOL
    assert _err(out, ref) < 1e-2


def test_kept_activations_at_16k(vt):
    """The figure the docs give: decode keeps 2.5 maps of 128 channels at full resolution (fp16: 80 GiB for
    16384x8192), encode 2 maps (64 GiB)."""
    m = _model("kl")
    H, W = 8192, 16384
    dec = vt.plan(m, (1, 4, H // 8, W // 8), what="decode", dtype=torch.float16)
    enc = vt.plan(m, (1, 3, H, W), what="encode", dtype=torch.float16)
    assert dec["kept_bytes"] == 320 * H * W * 2
    assert enc["kept_bytes"] == 256 * H * W * 2
    fast = vt.plan(m, (1, 4, H // 8, W // 8), what="decode", dtype=torch.float16, keep_upsampled=True)
    assert fast["kept_bytes"] == 512 * H * W * 2


def test_bad_input_is_named(vt):
    m = _model("kl")
    with pytest.raises(ValueError, match="tile_size"):
        vt.decode(m, torch.zeros(1, 4, 8, 8), tile=8)  # noqa
    with pytest.raises(ValueError, match="overlap"):
        vt.decode(m, torch.zeros(1, 4, 8, 8), overlap=-1)
    with pytest.raises(ValueError, match="16 channels, this VAE expects 4"):
        vt.decode(m, torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="multiples of 8"):
        vt.encode(m, torch.zeros(1, 3, 60, 64))
    with pytest.raises(vt.UnsupportedVAE, match="no model"):
        vt.check_supported(None)
    m.decoder.up[1].attn.append(torch.nn.Identity())
    with pytest.raises(vt.UnsupportedVAE, match="attention at level 1"):
        vt.decode(m, torch.zeros(1, 4, 8, 8))


# ------------------------------------------------------------------------------------------------- the nodes


@pytest.fixture(scope="module")
def comfy_vae(comfy_inproc):
    import comfy.sd
    m = _model("kl", seed=8)
    return comfy.sd.VAE(sd=m.state_dict())


def test_nodes_registered_with_comfyui_input_names(pack):
    for node_id, first in (("LinFusionVAEDecodeTiled", "samples"), ("LinFusionVAEEncodeTiled", "pixels")):
        cls = pack.NODE_CLASS_MAPPINGS[node_id]
        req = cls.INPUT_TYPES()["required"]
        assert list(req) == [first, "vae", "tile_size", "overlap"]
        assert all("tooltip" in spec[1] for spec in req.values())
        assert node_id in pack.NODE_DISPLAY_NAME_MAPPINGS


def test_nodes_match_untiled_comfyui_vae(pack, comfy_vae):
    import comfy.utils
    vae = copy.copy(comfy_vae)
    vae.first_stage_model = _swap_attention(copy.deepcopy(comfy_vae.first_stage_model), "identity")
    dec = pack.NODE_CLASS_MAPPINGS["LinFusionVAEDecodeTiled"]()
    enc = pack.NODE_CLASS_MAPPINGS["LinFusionVAEEncodeTiled"]()
    z = torch.randn(1, 4, 12, 40, generator=torch.Generator().manual_seed(9))  # wider than one 256-pixel tile
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: calls.append((v, t)))
    try:
        (img,) = dec.decode({"samples": z}, vae, tile_size=256, overlap=64)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    ref = vae.decode(z)
    assert img.shape == ref.shape == (1, 96, 320, 3)
    assert (img - ref).abs().max() < 1e-4
    assert calls and calls[-1][0] == calls[-1][1] and [v for v, _ in calls] == sorted(v for v, _ in calls)
    pix = torch.rand(1, 100, 300, 4, generator=torch.Generator().manual_seed(10))  # RGBA, not multiples of 8
    (lat,) = enc.encode(pix, vae, tile_size=256, overlap=64)
    ref_lat = vae.encode(pix[:, :, :, :3])
    assert lat["samples"].shape == ref_lat.shape == (1, 4, 12, 37)
    assert (lat["samples"] - ref_lat).abs().max() / ref_lat.abs().max() < TOL


def test_node_runs_an_image_of_one_tile_untiled(pack, comfy_vae):
    """An image no larger than one tile goes through ComfyUI's own untiled VAE: bit for bit its result (the tiled
    path would differ by float rounding and by nothing else)."""
    dec = pack.NODE_CLASS_MAPPINGS["LinFusionVAEDecodeTiled"]()
    enc = pack.NODE_CLASS_MAPPINGS["LinFusionVAEEncodeTiled"]()
    z = torch.randn(1, 4, 32, 24, generator=torch.Generator().manual_seed(13))  # 256x192 pixels, tile 256
    with torch.inference_mode():
        (img,) = dec.decode({"samples": z}, comfy_vae, tile_size=256, overlap=64)
        assert torch.equal(img, comfy_vae.decode(z))
        (lat,) = enc.encode(img, comfy_vae, tile_size=256, overlap=64)
        assert torch.equal(lat["samples"], comfy_vae.encode(img))


def test_node_honours_interrupt(pack, comfy_vae):
    import comfy.model_management as mm
    dec = pack.NODE_CLASS_MAPPINGS["LinFusionVAEDecodeTiled"]()
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            dec.decode({"samples": torch.zeros(1, 4, 16, 48)}, comfy_vae, tile_size=256, overlap=64)
    finally:
        mm.interrupt_current_processing(False)


def test_node_rejects_other_vaes_by_name(pack, comfy_vae):
    vae = copy.copy(comfy_vae)
    vae.first_stage_model = copy.deepcopy(comfy_vae.first_stage_model)
    del vae.first_stage_model.decoder.mid  # not the structure it knows
    dec = pack.NODE_CLASS_MAPPINGS["LinFusionVAEDecodeTiled"]()
    with pytest.raises(ValueError, match=r"SD-1\.x, SD-2\.x and SD-XL.*VAE Decode \(Tiled\)"):
        dec.decode({"samples": torch.zeros(1, 4, 16, 16)}, vae, tile_size=256, overlap=64)
    with pytest.raises(ValueError, match="image latents"):
        dec.decode({"samples": torch.zeros(1, 4, 2, 16, 16)}, comfy_vae, tile_size=256, overlap=64)


def test_node_falls_back_to_comfyui_tiling_when_ram_is_short(pack, comfy_vae, monkeypatch, caplog):
    """When the whole-image activations would not fit in free RAM, the node says so and runs ComfyUI's own tiled
    decode/encode (what VAE Decode/Encode (Tiled) would give) instead of exhausting memory."""
    vae_mod = pack.nodes.vae
    monkeypatch.setattr(vae_mod, "_available_ram", lambda: 1000)
    dec = pack.NODE_CLASS_MAPPINGS["LinFusionVAEDecodeTiled"]()
    enc = pack.NODE_CLASS_MAPPINGS["LinFusionVAEEncodeTiled"]()
    z = torch.randn(1, 4, 8, 40, generator=torch.Generator().manual_seed(12))  # more than one 256-pixel tile
    with caplog.at_level("WARNING"), torch.inference_mode():  # as ComfyUI runs nodes
        (img,) = dec.decode({"samples": z}, comfy_vae, tile_size=256, overlap=64)
        assert "falling back" in caplog.text
        assert torch.equal(img, comfy_vae.decode_tiled(z, tile_x=32, tile_y=32, overlap=8))
        (lat,) = enc.encode(img, comfy_vae, tile_size=256, overlap=64)
        assert torch.equal(lat["samples"], comfy_vae.encode_tiled(img, tile_x=256, tile_y=256, overlap=64))
