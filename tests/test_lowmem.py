"""The low-memory mode (linfusion_core/lowmem.py, nodes/lowmem.py): exact through whole true-size UNets (SD-1.5,
SD-XL) with and without a ControlNet, the chunked GroupNorm and the token-chunked LinFusion layer against float64,
the skip parking's CPU path, the memory estimate per mode, the auto switch.

No CUDA here: the skip parking runs its CPU path for real (plain copies into host tensors, a separate copy back);
its CUDA-only parts (pinned memory, the side stream, the events, the prefetch) are exercised by the GPU check
(benchmarks/gpu_check.py, rows "lowmem"), not by these tests."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from harness import controlnet_fixtures, fixtures, linfusion_fixtures

SIGMA = torch.tensor([1.5])
SMALL_CHUNK = 1 << 12  # forces the chunked GroupNorm and LinFusion layers at test sizes (defaults: 8 M, 16 M)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def L(pack):
    return pack.linfusion_core.lowmem


@pytest.fixture(scope="module")
def NL(pack):
    return pack.nodes.lowmem


@pytest.fixture
def small_chunks(pack, NL, monkeypatch):
    monkeypatch.setattr(NL.NormActSequential, "chunk_elements", SMALL_CHUNK)
    monkeypatch.setattr(NL, "BAND_ELEMENTS", SMALL_CHUNK)
    monkeypatch.setattr(pack.linfusion_core.layer.LinFusionAttention, "chunk_elements", SMALL_CHUNK)
    monkeypatch.setattr(pack.linfusion_core.attention.torch_fast, "_CHUNK_ELEMENTS", SMALL_CHUNK)  # 64 tokens


@pytest.fixture
def counts(pack, L, NL, monkeypatch):
    """How often the mode's pieces ran: skips parked, skips brought back, chunked GroupNorm+SiLU passes,
    LinFusion layers in token chunks, convolutions by bands of rows (ResBlocks' norm-SiLU-conv, upsamplers), ResBlocks
    with their sums in place, transformer blocks in token chunks, decoder concatenations handed to their ResBlock
    as parts, and those the ResBlock made whole."""
    c = {"park": 0, "fetch": 0, "chunked_gn": 0, "chunked_attn": 0, "banded": 0, "resblock": 0, "chunked_block": 0,
         "concat": 0, "whole": 0, "banded_skip": 0}
    park, fetch, gns = L.SkipParking.park, L.SkipParking.fetch, L.group_norm_silu
    attn = pack.linfusion_core.layer.LinFusionAttention

    def spy(name, fn):
        def inner(*a, **k):
            c[name] += 1
            return fn(*a, **k)
        return inner
    monkeypatch.setattr(L.SkipParking, "park", spy("park", park))
    monkeypatch.setattr(L.SkipParking, "fetch", spy("fetch", fetch))
    monkeypatch.setattr(L, "group_norm_silu", spy("chunked_gn", gns))
    monkeypatch.setattr(attn, "_token_chunked", spy("chunked_attn", attn._token_chunked))
    monkeypatch.setattr(L, "norm_silu_conv2d", spy("banded", L.norm_silu_conv2d))
    monkeypatch.setattr(L, "upsample_conv2d", spy("banded", L.upsample_conv2d))
    monkeypatch.setattr(L, "conv2d_rows", spy("banded_skip", L.conv2d_rows))
    monkeypatch.setattr(NL, "resblock_in_place", spy("resblock", NL.resblock_in_place))
    monkeypatch.setattr(NL, "transformer_block_in_chunks", spy("chunked_block", NL.transformer_block_in_chunks))
    monkeypatch.setattr(L.PendingConcat, "take_parts", spy("concat", L.PendingConcat.take_parts))
    monkeypatch.setattr(L.ConcatParts, "full", spy("whole", L.ConcatParts.full))
    return c


# -- the core: chunked GroupNorm + SiLU, skip parking ---------------------------------------------------------------

@pytest.mark.parametrize("shape,groups", [((1, 320, 40, 56), 32), ((2, 960, 17, 23), 32), ((1, 64, 7, 9), 8)])
def test_group_norm_silu_against_float64(L, shape, groups):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3 + 1.5  # an offset mean: a one-pass sum of squares would lose digits
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    ref = L.group_norm_silu_f64(x, groups, w, b)
    stock = F.silu(F.group_norm(x, groups, w, b))
    assert rel(stock, ref) < 2e-7  # the reference is right
    for chunk in (SMALL_CHUNK, 3001, 1 << 22):  # chunked (uneven last chunk) and one full pass
        for method in ("slabs", "two_pass"):
            y = L.group_norm_silu(x, groups, w, b, 1e-5, chunk, method=method)
            assert y.dtype == x.dtype and y.shape == x.shape
            assert rel(y, ref) <= 1.5 * rel(stock, ref) + 1e-8, (chunk, method)  # as close to float64 as torch's
            assert rel(y, stock) < 1e-6
            if method == "slabs":  # whole groups through torch's kernel; SiLU's vector tails may differ by an ulp
                assert (y - stock).abs().max() <= 4 * torch.finfo(y.dtype).eps * stock.abs().max(), chunk
    mean, rstd = L.group_norm_stats(x, groups, 1e-5, SMALL_CHUNK)
    xd = x.double().reshape(shape[0], groups, -1)
    assert torch.allclose(mean, xd.mean(-1), rtol=1e-6, atol=1e-7)  # float32 partial sums
    assert torch.allclose(rstd, 1 / torch.sqrt(xd.var(-1, unbiased=False) + 1e-5), rtol=1e-6)
    # half precision computes in float32 and rounds once: within fp16 rounding of the float64 result
    for method in ("slabs", "two_pass"):
        yh = L.group_norm_silu(x.half(), groups, w.half(), b.half(), 1e-5, SMALL_CHUNK, method=method)
        assert yh.dtype == torch.float16 and rel(yh, ref) < 2e-3
    # no weight / bias; the input is never written
    x0 = x.clone()
    for method in ("slabs", "two_pass"):
        y = L.group_norm_silu(x, groups, None, None, 1e-5, SMALL_CHUNK, method=method)
        assert rel(y, L.group_norm_silu_f64(x, groups, None, None)) < 2e-7
    assert torch.equal(x, x0)


@pytest.mark.parametrize("shape,groups,out_c", [((1, 960, 37, 23), 32, 48), ((2, 320, 16, 20), 32, 64),
                                                 ((1, 64, 9, 7), 8, 16)])
def test_convolutions_in_bands_bit_exact(L, shape, groups, out_c):
    """The mode's banded GroupNorm -> SiLU -> conv (a ResBlock's layers) and nearest-resize -> conv (an Upsample):
    the same bits as the full-size ops (torch's own group statistics, its kernel's affine form; the same sums per
    output pixel), for bands of one row up to one band, uneven last bands, two samples, odd resize factors; the
    float64 path against the float64 definition; the input is never written."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * 3 + 1.5
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    conv = torch.nn.Conv2d(shape[1], out_c, 3, padding=1)
    up = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1)
    x0 = x.clone()
    row = shape[0] * shape[1] * shape[3]
    with torch.no_grad():
        full = conv(F.silu(F.group_norm(x, groups, w, b, 1e-5)))
        scale, shift = L.group_norm_scale_shift(x, groups, w, b, 1e-5, chunk_elements=SMALL_CHUNK)
        assert torch.equal(torch.addcmul(shift, x, scale), F.group_norm(x, groups, w, b, 1e-5))
        for band in (1, 2 * row + 5, 1 << 30):
            y = L.norm_silu_conv2d(x, scale, shift, conv.weight, conv.bias, conv.padding, band)
            assert torch.equal(y, full), band
        for size in ((2 * shape[2], 2 * shape[3]), (2 * shape[2] + 1, 2 * shape[3] - 1)):
            ref = up(F.interpolate(x, size=size, mode="nearest"))
            assert torch.equal(L.upsample_conv2d(x, size, up.weight, up.bias, up.padding, 4 * row + 1), ref), size
        # bf16 (as a GPU would run fp16/bf16): float32 statistics, normalised in float32 and rounded once, as
        # torch's kernel does; far within bf16 rounding of the stock ops (measured 0 to 4.5e-5), and as close to
        # the fp32 result as they are
        xb, convb = x.bfloat16(), torch.nn.Conv2d(shape[1], out_c, 3, padding=1).bfloat16()
        convb.load_state_dict({k: v.bfloat16() for k, v in conv.state_dict().items()})
        stock_b = convb(F.silu(F.group_norm(xb, groups, w.bfloat16(), b.bfloat16(), 1e-5)))
        sb, hb = L.group_norm_scale_shift(xb, groups, w.bfloat16(), b.bfloat16(), 1e-5, chunk_elements=SMALL_CHUNK)
        assert sb.dtype == torch.float32
        yb = L.norm_silu_conv2d(xb, sb, hb, convb.weight, convb.bias, conv.padding, 2 * row + 5)
        # (with the kernel's statistics as it returns them, rounded to bf16: 3.5e-3 from stock, 4.4e-3 from fp32)
        assert yb.dtype == torch.bfloat16 and rel(yb, stock_b) < 5e-4
        assert rel(yb, full) <= 1.02 * rel(stock_b, full)
        xd, convd = x.double(), conv.double()
        sd, hd = L.group_norm_scale_shift(xd, groups, w.double(), b.double(), 1e-5, chunk_elements=SMALL_CHUNK)
        yd = L.norm_silu_conv2d(xd, sd, hd, convd.weight, convd.bias, conv.padding, 2 * row + 5)
        refd = convd(L.group_norm_silu_f64(x, groups, w, b))
        assert yd.dtype == torch.float64 and rel(yd, refd) < 1e-12
    assert torch.equal(x, x0)


def test_concat_parts_read_by_bands(L):
    """A decoder concatenation read by pieces (``ConcatParts``): its bands of rows and slabs of channels (across
    the parts' boundary too) are those of ``torch.cat``; the GroupNorm statistics, the banded norm-SiLU-conv and
    the banded 1x1 skip convolution over it give the same bits as over the concatenation made whole (single-
    threaded; with this machine's threads within 1e-6 at the widths of a 16K image's latent)."""
    g = torch.Generator().manual_seed(5)
    # (36 + 28 channels: the fifth of 8 groups straddles the parts)
    a, b = torch.randn(1, 36, 19, 11, generator=g), torch.randn(1, 28, 19, 11, generator=g) * 2 + 1
    full = torch.cat([a, b], 1)
    p = L.ConcatParts(a, b)
    assert (p.shape, p.dtype, p.dim(), p.numel()) == (full.shape, full.dtype, 4, full.numel())
    assert torch.equal(p.full(), full) and torch.equal(p.rows(3, 9), full[:, :, 3:9])
    for c0, c1 in ((0, 36), (0, 16), (32, 40), (36, 64), (48, 64), (0, 64)):
        assert torch.equal(p.channels(c0, c1), full[:, c0:c1]), (c0, c1)
    w, bias = torch.randn(64, generator=g), torch.randn(64, generator=g)
    conv3, conv1 = torch.nn.Conv2d(64, 16, 3, padding=1), torch.nn.Conv2d(64, 16, 1)
    row = 64 * 11
    with torch.no_grad(), fixtures.torch_threads(1):
        scale, shift = L.group_norm_scale_shift(full, 8, w, bias, 1e-5, chunk_elements=3 * 8 * 19 * 11)
        s2, h2 = L.group_norm_scale_shift(p, 8, w, bias, 1e-5, chunk_elements=3 * 8 * 19 * 11)
        assert torch.equal(scale, s2) and torch.equal(shift, h2)
        for band in (1, 2 * row + 5):
            y = L.norm_silu_conv2d(p, scale, shift, conv3.weight, conv3.bias, conv3.padding, band)
            assert torch.equal(y, conv3(F.silu(F.group_norm(full, 8, w, bias, 1e-5)))), band
            assert torch.equal(L.conv2d_rows(p, conv1.weight, conv1.bias, conv1.padding, band), conv1(full)), band
    # a decoder ResBlock's skip convolution at a 16K latent's width, with the default bands and this machine's
    # threads: oneDNN's thread split may differ from the whole tensor's (skip_conv's docstring), within 1e-6
    x = torch.randn(1, 960, 24, 1024, generator=g)
    skip = torch.nn.Conv2d(960, 320, 1)
    with torch.no_grad():
        ref = skip(x)
        parts = L.ConcatParts(x[:, :640].contiguous(), x[:, 640:].contiguous())
        banded = L.conv2d_rows(parts, skip.weight, skip.bias, skip.padding, 1 << 22)
    print(f"skip convolution 960 -> 320 at 24x1024 by 4 M-element bands: {rel(banded, ref):.2e} relative")
    assert rel(banded, ref) < 1e-6


def test_pending_concat(L, caplog):
    """The stand-in for the decoder's concatenation: passes through ``cat`` with a part of no channels as a new
    stand-in (no data made), gives exactly ``torch.cat`` when taken or when any other op reads it (logged once
    per op), keeps the metadata the UNet reads, and once taken refuses to be read again."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 6, 5, 7, generator=g), torch.randn(2, 3, 5, 7, generator=g)
    ref = torch.cat([a, b], dim=1)
    assert L.PendingConcat.can_stand_for(a, b)
    assert not L.PendingConcat.can_stand_for(a, b.double()) and not L.PendingConcat.can_stand_for(a, b[:1])
    assert not L.PendingConcat.can_stand_for(a, b[:, :, :4])
    p = L.PendingConcat(a, b)
    assert (p.shape, p.dtype, p.device, p.dim(), p.is_contiguous()) == (ref.shape, ref.dtype, ref.device, 4, True)
    q = torch.cat([p, a.new_empty(2, 0, 5, 7)], dim=1)  # as ComfyUI's UNet concatenates
    assert type(q) is L.PendingConcat and q.shape == ref.shape and q.parts[0] is a and q.parts[1] is b
    with pytest.raises(RuntimeError, match="read again"):  # the first stand-in gave its parts on
        p.take()
    conv = torch.nn.Conv2d(9, 4, 1)
    with caplog.at_level(logging.INFO, logger="LinFusion"), torch.no_grad():
        for op in (lambda t: t + 1, lambda t: F.group_norm(t, 3), conv, lambda t: t.sum(dim=(2, 3))):
            out = op(q)
            assert type(out) is torch.Tensor and torch.equal(out, op(ref))
        conv(q)
    assert caplog.text.count("aten.convolution") == 1  # once per op
    assert "made in full" in caplog.text
    with pytest.raises(RuntimeError, match="write into"):  # it would write into a temporary copy
        q.mul_(2)
    assert q.parts is not None
    taken = q.take()
    assert type(taken) is torch.Tensor and torch.equal(taken, ref) and q.parts is None
    with pytest.raises(RuntimeError, match="read again"):
        q + 1
    assert torch.equal(a, ref[:, :6]) and torch.equal(b, ref[:, 6:])  # the parts are never written


def _layer(pack, c, heads, dtype, projections, seed=0):
    """A LinFusion layer over a stand-in for ComfyUI's CrossAttention (only its attributes are used)."""
    core = pack.linfusion_core

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads, self.dim_head = heads, c // heads
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(c, c, bias=False) for _ in range(3))
            self.to_out = torch.nn.Sequential(torch.nn.Linear(c, c))

    g = torch.Generator().manual_seed(seed)
    base = Base()
    with torch.no_grad():
        for prm in base.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * c ** -0.5)
    t = linfusion_fixtures.layer_tensors(c, c, g, projections=projections)
    lw = core.checkpoint.LayerWeights(0, c, c, projections, tensors=t)
    return core.layer.build_layer(base.to(dtype), lw, dtype=dtype)


@pytest.mark.parametrize("projections,batch", [(True, 2), (False, 1)])
def test_layer_in_token_chunks_against_float64(pack, L, projections, batch, monkeypatch):
    """The low-memory mode's token-chunked LinFusion layer (state summed over key chunks, then query chunks):
    as close to the float64 layer as the full-size fp32 layer is, and within 1e-6 of it; uneven last chunk, two
    samples, the base's projections or the file's; without the mode's flag the full-size path runs."""
    lay32 = _layer(pack, 320, 8, torch.float32, projections)
    lay64 = _layer(pack, 320, 8, torch.float64, projections)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1000, 320, generator=g)
    calls = []
    chunked = type(lay32)._token_chunked
    monkeypatch.setattr(type(lay32), "_token_chunked", lambda self, *a: calls.append(1) or chunked(self, *a))
    with torch.no_grad():
        ref = lay64(x.double())
        monkeypatch.setattr(type(lay32), "chunk_elements", batch * 200 * 320)  # 192-token chunks: 6, the last of 40
        monkeypatch.setattr(pack.linfusion_core.attention.torch_fast, "_CHUNK_ELEMENTS", batch * 64 * 320)  # 64
        full = lay32(x)  # with the attention's 64-token chunks
        assert not calls and torch.equal(lay32(x), full)  # the flag is off: full size
        with L.enabled():
            parts = lay32(x)
        assert len(calls) == 1
    err_full, err_parts = rel(full, ref), rel(parts, ref)
    print(f"LinFusion layer, token chunks: {err_parts:.2e} from float64 (full size {err_full:.2e}), "
          f"{rel(parts, full):.2e} from full size")
    assert err_full < 1e-6
    assert err_parts <= 1.5 * err_full + 1e-8
    assert rel(parts, full) < 1e-6


def test_skip_parking_cpu_path(L):
    """Parks copies (not the tensors themselves), gives back copies last in first out, moves foreign tensors."""
    p = L.SkipParking("cpu")
    assert not p.cuda and p.stream is None
    ts = [torch.randn(2, 3, 4, 5) for _ in range(3)]
    hosts = [p.park(t) for t in ts]
    assert all(h is not t and h.data_ptr() != t.data_ptr() and torch.equal(h, t) for h, t in zip(hosts, ts))
    assert p.parked_bytes == p.peak_parked_bytes == 3 * ts[0].numel() * 4 and len(p) == 3
    for h, t in zip(reversed(hosts), reversed(ts)):
        back = p.fetch(h)
        assert back is not h and back.data_ptr() != h.data_ptr() and torch.equal(back, t)
    assert len(p) == 0 and p.parked_bytes == 0
    other = torch.ones(2)
    assert p.fetch(other) is other  # not parked: moved (already here)
    pool = []
    q = L.SkipParking("cpu", host_alloc=lambda shape, dtype: pool.append(torch.zeros(shape, dtype=dtype)) or pool[-1])
    assert q.park(ts[0]) is pool[0] and torch.equal(pool[0], ts[0])


def test_skip_bytes_sd15(L):
    # SD-1.5 at 64x64 latent: conv_in 320 + level 0 2x320 + down 320/4 + level 1 2x640/4 + down 640/16 + ...
    per_px = 320 + 640 + 80 + 320 + 40 + 160 + 20 + 40
    assert L.skip_bytes((1, 4, 64, 64), (1, 2, 4, 4), 320, 2, 2) == per_px * 64 * 64 * 2


# -- whole UNets --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15(comfy_inproc, pack, tmp_path_factory):
    import comfy.model_management as mm
    unet = fixtures.load_unet("sd15")
    d = tmp_path_factory.mktemp("lf")
    ck = pack.linfusion_core.checkpoint.load_checkpoint(
        linfusion_fixtures.write("sd15", d / "lf.safetensors", layout="file", seed=4))
    yield {"unet": unet, "ck": ck}
    mm.unload_all_models()
    del unet
    mm.soft_empty_cache()


def _apply(pack, unet, ck, mode):
    return pack.nodes.patching.apply_linfusion(unet, ck, 0, mode)


def _run(m, x, t=SIGMA, control=None, **cond):
    import comfy.model_management as mm
    mm.load_models_gpu([m])
    with torch.no_grad():
        return m.model.apply_model(x, t, control=control, transformer_options=sampling_options(m), **cond).float()


sampling_options = fixtures.sampling_options  # as ComfyUI's sampler hands transformer_options on


@pytest.fixture
def one_thread():
    """Single-threaded, where the mode gives the same bits as without it (see ``_assert_exact``)."""
    with fixtures.torch_threads(1):
        yield


def _assert_exact(label: str, on, off, run):
    """Mode on against mode off, ``on``/``off`` from this machine's thread count, ``run(mode)`` a step of either.
    Single-threaded the two are the same bits: every piece of the mode sums each value as the full-size op does.
    With several threads oneDNN splits a band's 1x1 convolution (the ResBlocks' skip convolutions) among them
    otherwise than the whole tensor's for some shapes (``nodes.lowmem.skip_conv``); the issue's bound is 1e-6
    relative, and stock ComfyUI itself moves by about that between thread counts (measured here 0.9 to 1.3e-6),
    so the bound here is the larger of 1e-6 and twice that spread, measured in the same test."""
    with fixtures.torch_threads(1):
        off1, on1 = run("off"), run("on")
    spread = rel(off1, off)
    print(f"{label}, mode on vs off: {rel(on, off):.2e} relative with {torch.get_num_threads()} threads, "
          f"{rel(on1, off1):.2e} with 1 (stock, 1 thread against {torch.get_num_threads()}: {spread:.2e})")
    assert torch.equal(on1, off1), rel(on1, off1)
    assert rel(on, off) <= max(1e-6, 2 * spread), (rel(on, off), spread)


def _sd15_inputs(seed=0, h=24, w=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, h, w, generator=g), torch.randn(1, 77, 768, generator=g)


def test_off_installs_nothing_and_input_model_untouched(pack, sd15, NL):
    import comfy.patcher_extension as pe
    unet = sd15["unet"]
    off = _apply(pack, unet, sd15["ck"], "off")
    on = _apply(pack, unet, sd15["ck"], "on")
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    assert not any(isinstance(v, (NL.NormActSequential, oai.ResBlock)) for v in off.object_patches.values())
    assert not off.get_wrappers(pe.WrappersMP.APPLY_MODEL, NL.KEY)
    blocks = {k: v for k, v in on.object_patches.items() if isinstance(v, oai.ResBlock)}
    assert len(blocks) == 22  # SD-1.5: 22 ResBlocks (8 input side, 2 middle, 12 output side)
    # one patch per ResBlock, none on their children (ComfyUI restores patches one by one: a child restored after
    # its parent would land on the original block)
    assert not any(k.startswith(tuple(b + "." for b in blocks)) for k in on.object_patches)
    for k, b in blocks.items():  # ComfyUI's ResBlock over the same children, its in/out layers ours
        orig = unet.get_model_object(k)
        assert type(orig) is oai.ResBlock and type(b) is not oai.ResBlock
        # same children under the same names: weight keys and LoRA keys resolve to the same modules
        assert b.emb_layers is orig.emb_layers and b.skip_connection is orig.skip_connection
        for part in ("in_layers", "out_layers"):
            seq = getattr(b, part)
            assert type(seq) is NL.NormActSequential and list(seq._modules) == list(getattr(orig, part)._modules)
            assert all(m is o for m, o in zip(seq, getattr(orig, part)))
    ups = {k: v for k, v in on.object_patches.items() if isinstance(v, oai.Upsample)}
    assert sorted(ups) == [f"diffusion_model.output_blocks.{i}.{j}" for i, j in ((2, 1), (5, 2), (8, 2))]
    for k, up in ups.items():  # ComfyUI's Upsample, over the same convolution
        assert type(up) is not oai.Upsample and up.conv is unet.get_model_object(k).conv
        assert type(unet.get_model_object(k)) is oai.Upsample
    # an upsampler another pack put in place (an object patch of its own) is left alone
    other = unet.clone()

    class TheirUpsample(oai.Upsample):
        pass
    theirs = NL._same_children(TheirUpsample, unet.get_model_object(sorted(ups)[0]))
    other.add_object_patch(sorted(ups)[0], theirs)
    on2 = _apply(pack, other, sd15["ck"], "on")
    assert on2.object_patches[sorted(ups)[0]] is theirs
    assert all(type(on2.object_patches[k]) is type(ups[k]) for k in sorted(ups)[1:])
    # while a patched copy is loaded, the shared module tree holds our upsamplers: a new copy still gets its own
    import comfy.model_management as mm
    mm.load_models_gpu([on])
    try:
        again = _apply(pack, unet, sd15["ck"], "on")
        assert sorted(k for k, v in again.object_patches.items() if isinstance(v, oai.Upsample)) == sorted(ups)
    finally:
        mm.unload_all_models()
    assert on.get_wrappers(pe.WrappersMP.APPLY_MODEL, NL.KEY)
    # every SpatialTransformer's block list: ours over the same children dict, so that the LinFusion patches under
    # it land on the same blocks whichever is applied first
    lists = {k: v for k, v in on.object_patches.items() if isinstance(v, NL.ChunkedBlockList)}
    assert len(lists) == 16 and all(k.endswith(".transformer_blocks") for k in lists)
    for k, v in lists.items():
        assert v._modules is unet.get_model_object(k)._modules
    assert any(k.startswith(tuple(lists)) for k in on.object_patches)  # the attn1 patches under them
    assert unet.object_patches == {} and not unet.get_wrappers(pe.WrappersMP.APPLY_MODEL, NL.KEY)
    # the copy was loaded (patched) and unloaded above: the shared tree is ComfyUI's again
    dm = unet.model.diffusion_model
    assert type(dm.input_blocks[1][1].transformer_blocks) is torch.nn.ModuleList
    assert type(dm.input_blocks[1][1].transformer_blocks[0].attn1).__name__ == "CrossAttention"
    assert type(unet.model.diffusion_model.input_blocks[1][0]) is oai.ResBlock
    assert type(unet.model.diffusion_model.input_blocks[1][0].in_layers) is torch.nn.Sequential


def test_sd15_unet_exact(pack, sd15, counts, small_chunks):
    """Mode on against mode off through the whole true-size SD-1.5 UNet (fp32): <= 1e-6 relative; every skip
    went through the parking, every ResBlock's norm through the chunked pass and every LinFusion layer through
    token chunks."""
    x, c = _sd15_inputs()
    off = _run(_apply(pack, sd15["unet"], sd15["ck"], "off"), x, c_crossattn=c)
    assert set(counts.values()) == {0}
    on = _run(_apply(pack, sd15["unet"], sd15["ck"], "on"), x, c_crossattn=c)
    assert counts["park"] == counts["fetch"] == 12
    assert counts["banded"] == 2 * 22 + 3  # every ResBlock's two norm-SiLU-convs, the three upsamplers
    assert counts["banded_skip"] == 14  # the 1x1 skip convolutions: the 12 decoder blocks', input blocks 4 and 7
    assert counts["resblock"] == 22  # every ResBlock's sums in place
    # SD-1.5's 16 transformer blocks in token chunks (their LinFusion layers' two passes inside)
    assert counts["chunked_block"] == 16 and counts["chunked_attn"] == 0
    # every output block's concatenation handed to its ResBlock as its two parts, read by bands (never made
    # whole), and released before the block's next layer runs (ComfyUI's UNet would hold it through the block)
    assert counts["concat"] == 12 and counts["whole"] == 0
    _assert_exact("SD-1.5 UNet", on, off, lambda mode: _run(_apply(pack, sd15["unet"], sd15["ck"], mode), x,
                                                                 c_crossattn=c))
    assert not torch.equal(on, torch.zeros_like(on))
    # without the chunked norm and attention the skips alone are bit-exact
    counts["park"] = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pack.nodes.lowmem.NormActSequential, "chunk_elements", 1 << 30)
        mp.setattr(pack.nodes.lowmem, "BAND_ELEMENTS", 1 << 30)
        mp.setattr(pack.linfusion_core.layer.LinFusionAttention, "chunk_elements", 1 << 30)
        whole = _run(_apply(pack, sd15["unet"], sd15["ck"], "on"), x, c_crossattn=c)
    assert counts["park"] == 12 and torch.equal(whole, off)
    assert counts["whole"] == 12  # (unbanded: each concatenation made whole by its ResBlock)


def test_decoder_concatenations_released_after_their_resblock(pack, L, NL, sd15, counts, small_chunks, monkeypatch,
                                                            one_thread):
    """In the mode, each output block's concatenation (skip + input) goes to the block's ResBlock as its two parts,
    which it reads by bands and frees when it is done: neither is alive when the block's next layer runs
    (ComfyUI's UNet holds the concatenation through the whole block). An output block whose ResBlock is another pack's keeps ComfyUI's concatenation. Exact both ways
    (single-threaded: the same bits)."""
    import weakref

    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    refs, alive = [], []
    take = L.PendingConcat.take_parts

    def spy(self):
        t = take(self)  # the concatenation's parts, read by bands
        refs.extend(weakref.ref(o) for o in (t, *t.parts))
        return t
    monkeypatch.setattr(L.PendingConcat, "take_parts", spy)
    x, c = _sd15_inputs(2)
    off = _run(_apply(pack, sd15["unet"], sd15["ck"], "off"), x, c_crossattn=c)
    dm = sd15["unet"].model.diffusion_model
    nexts = [blk[1] for blk in dm.output_blocks if len(blk) > 1 and isinstance(blk[1], oai.SpatialTransformer)]
    assert len(nexts) == 9
    hooks = [m.register_forward_pre_hook(lambda m, a: alive.append(sum(r() is not None for r in refs)))
             for m in nexts]
    try:
        on = _run(_apply(pack, sd15["unet"], sd15["ck"], "on"), x, c_crossattn=c)
        assert len(refs) == 3 * 12 and len(alive) == 9 and alive == [0] * 9, alive
        assert torch.equal(on, off), rel(on, off)
        # another pack's ResBlock at output block 4: its concatenation is ComfyUI's, held through its block
        other = sd15["unet"].clone()

        class TheirResBlock(oai.ResBlock):
            pass
        key = "diffusion_model.output_blocks.4.0"
        other.add_object_patch(key, NL._same_children(TheirResBlock, other.get_model_object(key)))
        refs.clear(), alive.clear()
        counts["concat"] = 0
        on2 = _run(_apply(pack, other, sd15["ck"], "on"), x, c_crossattn=c)
        assert counts["concat"] == 11 and alive == [0] * 9
        assert torch.equal(on2, off), rel(on2, off)
        # a wrapper inside ours that adds an output block patch after ours: that patch must never get the stand-in
        import comfy.patcher_extension as pe
        inner = _apply(pack, sd15["unet"], sd15["ck"], "on")
        seen = []

        def theirs(h, hsp, transformer_options):
            seen.append((type(h), hsp.shape[1]))
            return h, hsp

        def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
            to = dict(transformer_options)
            to["patches"] = dict(to.get("patches", {}))
            to["patches"]["output_block_patch"] = list(to["patches"].get("output_block_patch", [])) + [theirs]
            return executor(x, t, c_concat, c_crossattn, control, to, **kw)
        inner.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "theirs", wrapper)
        counts["concat"] = 0
        on3 = _run(inner, x, c_crossattn=c)
        assert len(seen) == 12 and all(t is torch.Tensor and n > 0 for t, n in seen) and counts["concat"] == 0
        assert torch.equal(on3, off), rel(on3, off)
    finally:
        for h in hooks:
            h.remove()


def test_transformer_blocks_with_patches_run_as_comfyui(pack, sd15, counts, small_chunks, one_thread):
    """A patch that runs inside a transformer block (here an attn2_patch and an attn1 output patch, as other node
    packs install) or an attention replacement: those blocks run as ComfyUI's, with the patches, and the mode is
    still exact against off (single-threaded: the same bits)."""
    x, c = _sd15_inputs(4, 16, 24)
    seen = []

    def attn2_patch(n, context, value, extra):
        seen.append(extra["block"])
        return n * 1.25, context, value

    def out_patch(n, extra):
        return n * 0.5
    runs = {}
    for mode in ("off", "on"):
        m = _apply(pack, sd15["unet"], sd15["ck"], mode)
        m.set_model_attn2_patch(attn2_patch)
        m.set_model_attn1_output_patch(out_patch)
        runs[mode] = _run(m, x, c_crossattn=c)
    assert len(seen) == 2 * 16  # every block ran its patch, in both modes
    assert counts["chunked_block"] == 0 and counts["park"] == 12 and counts["chunked_attn"] == 16
    assert torch.equal(runs["on"], runs["off"])
    plain = _run(_apply(pack, sd15["unet"], sd15["ck"], "off"), x, c_crossattn=c)
    assert rel(runs["off"], plain) > 1e-3  # the patches did something
    # an attention replacement for one block

    def replace(q, k, v, extra):
        import comfy.ldm.modules.attention as attention
        return attention.optimized_attention(q, k, v, extra["n_heads"])
    counts["chunked_block"] = 0
    for mode in ("off", "on"):
        m = _apply(pack, sd15["unet"], sd15["ck"], mode)
        m.set_model_attn2_replace(replace, "input", 1)
        runs[mode] = _run(m, x, c_crossattn=c)
    assert counts["chunked_block"] == 0  # any replacement present: every block as ComfyUI's (simple and safe)
    assert torch.equal(runs["on"], runs["off"])


def test_another_packs_child_patch_is_kept(pack, NL, sd15, counts, small_chunks, one_thread, caplog):
    """Another pack's object patch on a child of a ResBlock or of an upsampler (here their convolutions, replaced
    by scaled copies), set before Apply LinFusion: ComfyUI applies object patches in the order they were added, so
    ours on the parent would replace the parent after theirs and hide it. Those blocks keep ComfyUI's modules (the
    mode leaves them whole; logged), theirs takes effect in both modes, and the mode is still exact."""
    x, c = _sd15_inputs(5, 16, 24)
    plain = _run(_apply(pack, sd15["unet"], sd15["ck"], "off"), x, c_crossattn=c)
    other = sd15["unet"].clone()
    keys = ("diffusion_model.output_blocks.9.0.in_layers.2", "diffusion_model.output_blocks.5.2.conv")
    for key in keys:
        conv = other.get_model_object(key)
        theirs = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        with torch.no_grad():
            theirs.weight.copy_(conv.weight * 1.5)
            theirs.bias.copy_(conv.bias)
        other.add_object_patch(key, theirs)
    off = _run(_apply(pack, other, sd15["ck"], "off"), x, c_crossattn=c)
    assert rel(off, plain) > 1e-3  # their patches matter
    import comfy.model_management as mm
    mm.unload_all_models()  # (a loaded copy would leave theirs in the shared module tree, where ours would copy it)
    with caplog.at_level(logging.INFO, logger="LinFusion"):
        on_model = _apply(pack, other, sd15["ck"], "on")
    assert ("2 block(s) run whole" in caplog.text and "output_blocks.9.0," in caplog.text
            and "output_blocks.5.2)" in caplog.text), caplog.text
    on = _run(on_model, x, c_crossattn=c)
    assert torch.equal(on, off), rel(on, off)
    for key in keys:
        parent = key.rsplit(".", 2)[0] if key.endswith("in_layers.2") else key.rsplit(".", 1)[0]
        assert parent not in on_model.object_patches, parent  # left as it is
    assert counts["resblock"] == 22 - 1 and counts["park"] == 12


def _controlnet_residuals(net, x, cond, seed=3):
    """ComfyUI's sampler path: ControlNetApplyAdvanced's copy, set_cond_hint, pre_run, get_control."""
    import comfy.model_management
    import comfy.model_sampling

    class MS(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    class Model:
        model_sampling = MS(None)

    g = torch.Generator().manual_seed(seed)
    hint = torch.rand(1, 3, 8 * x.shape[2], 8 * x.shape[3], generator=g)
    c = net.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    c.pre_run(Model(), lambda p: Model.model_sampling.percent_to_sigma(p))
    comfy.model_management.load_models_gpu(c.get_models())
    with torch.no_grad():
        out = c.get_control(x, SIGMA, cond, 1, {})
    c.cleanup()
    return out


def _fresh(control):
    """A new control dict over the same tensors (the UNet pops its lists)."""
    return {k: list(v) for k, v in control.items()}


def test_sd15_unet_exact_with_controlnet(pack, sd15, counts, small_chunks, monkeypatch, caplog):
    """A real-architecture SD-1.5 ControlNet attached: mode on equals mode off (<= 1e-6 relative), the residuals
    change the output (so they were added), and ComfyUI's own output-side apply_control never meets a parked
    skip together with a residual (on CUDA that add would fail and be dropped with a warning)."""
    import comfy.controlnet
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    net = comfy.controlnet.load_controlnet(str(controlnet_fixtures.ensure_controlnet("sd15", "original")))
    x, c = _sd15_inputs(1)
    control = _controlnet_residuals(net, x, {"c_crossattn": c})
    assert len(control["output"]) == 12 and all(t is not None for t in control["output"])
    plain = _run(_apply(pack, sd15["unet"], sd15["ck"], "off"), x, c_crossattn=c)
    off = _run(_apply(pack, sd15["unet"], sd15["ck"], "off"), x, control=_fresh(control), c_crossattn=c)
    assert rel(off, plain) > 1e-3  # the ControlNet matters

    seen = []
    real_apply_control = oai.apply_control

    def watch(h, ctrl, name):
        if name == "output" and ctrl is not None and ctrl.get(name):
            seen.append(ctrl[name][-1] is None)
        return real_apply_control(h, ctrl, name)
    monkeypatch.setattr(oai, "apply_control", watch)
    with caplog.at_level(logging.WARNING):
        on = _run(_apply(pack, sd15["unet"], sd15["ck"], "on"), x, control=_fresh(control), c_crossattn=c)
    assert "control could not be applied" not in caplog.text
    assert counts["park"] == 12 and len(seen) == 12 and all(seen)  # ComfyUI got Nones; the patch added them
    assert counts["banded"] == 2 * 22 + 3 and counts["resblock"] == 22 and counts["concat"] == 12
    _assert_exact("SD-1.5 UNet + ControlNet", on, off,
                  lambda mode: _run(_apply(pack, sd15["unet"], sd15["ck"], mode), x, control=_fresh(control),
                                    c_crossattn=c))
    del net


def test_sdxl_unet_exact(pack, comfy_inproc, counts, small_chunks, tmp_path_factory):
    """The true-size SD-XL UNet (10 GB in fp32), mode on against off, with a real-architecture SD-XL ControlNet
    (diffusers' "small" layout) attached in a second pair of steps."""
    import comfy.controlnet
    import comfy.model_management as mm
    unet = fixtures.load_unet("sdxl")
    try:
        d = tmp_path_factory.mktemp("lfxl")
        ck = pack.linfusion_core.checkpoint.load_checkpoint(
            linfusion_fixtures.write("sdxl", d / "lf.safetensors", layout="file", seed=4, projections=False))
        g = torch.Generator().manual_seed(2)
        x = torch.randn(1, 4, 16, 24, generator=g)
        cond = {"c_crossattn": torch.randn(1, 77, 2048, generator=g), "y": torch.randn(1, 2816, generator=g)}
        off = _run(_apply(pack, unet, ck, "off"), x, **cond)
        on = _run(_apply(pack, unet, ck, "on"), x, **cond)
        assert counts["park"] == counts["fetch"] == 9
        assert counts["chunked_block"] == 70 and counts["chunked_attn"] == 0  # SD-XL's 70 transformer blocks
        assert counts["banded"] == 2 * 17 + 2  # SD-XL: 17 ResBlocks (6 in, 2 middle, 9 out), 2 upsamplers
        assert counts["resblock"] == 17 and counts["concat"] == 9
        _assert_exact("SD-XL UNet", on, off, lambda mode: _run(_apply(pack, unet, ck, mode), x, **cond))
        net = comfy.controlnet.load_controlnet(str(controlnet_fixtures.ensure_controlnet("sdxl-small", "diffusers")))
        control = _controlnet_residuals(net, x, cond)
        off_c = _run(_apply(pack, unet, ck, "off"), x, control=_fresh(control), **cond)
        on_c = _run(_apply(pack, unet, ck, "on"), x, control=_fresh(control), **cond)
        assert rel(off_c, off) > 1e-3
        _assert_exact("SD-XL UNet + ControlNet", on_c, off_c,
                      lambda mode: _run(_apply(pack, unet, ck, mode), x, control=_fresh(control), **cond))
        del net
    finally:
        mm.unload_all_models()
        del unet
        mm.soft_empty_cache()


# -- the estimate and the auto switch -------------------------------------------------------------------------------

def test_estimate_knows_the_mode(pack, sd15, monkeypatch):
    import comfy.model_management as mm
    memory = pack.nodes.memory
    families = pack.linfusion_core.families.BY_KEY
    sd = families["sd15"]
    assert "lowmem" in sd.memory and "lowmem" in families["sdxl"].memory
    big = [1, 4, 2048, 1024]  # SD-1.5 16K
    for fam in ("sd15", "sdxl"):
        for dsize in (2, 4):
            off = memory.linear_estimate(big, dsize, families[fam])
            low = memory.linear_estimate(big, dsize, families[fam], low_memory=True)
            assert low < off, fam  # measured: SD-1.5 saves little (its peak is level 0's attention), SD-XL ~40 %
    small = [1, 4, 8, 8]
    assert memory.linear_estimate(small, 4, sd, low_memory=True) <= memory.linear_estimate(small, 4, sd)

    on = _apply(pack, sd15["unet"], sd15["ck"], "on").object_patches["memory_required"]
    off = _apply(pack, sd15["unet"], sd15["ck"], "off").object_patches["memory_required"]
    auto = _apply(pack, sd15["unet"], sd15["ck"], "auto").object_patches["memory_required"]
    e_off, e_on = off(big), on(big)
    assert e_on == memory.linear_estimate(big, 4, sd, low_memory=True) * 1.0 < e_off == memory.linear_estimate(big, 4, sd)
    assert auto(big, low_memory=False) == e_off and auto(big, low_memory=True) == e_on

    mm.load_models_gpu([_apply(pack, sd15["unet"], sd15["ck"], "auto")])  # weights resident: free is all for the step
    free = {"v": 1e15}
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: free["v"])
    assert auto(big) == e_off and not auto.low_memory_needed(big)  # fits: the ordinary line (ComfyUI batches)
    free["v"] = e_off - 1
    assert auto(big) == e_on and auto.low_memory_needed(big)  # does not fit: the mode's line
    # CFG: cond + uncond (2 rows) do not fit, one does: report the ordinary line so ComfyUI runs them one by one
    two = [2] + big[1:]
    free["v"] = (off(big) + off(two)) / 2
    assert auto(two) == off(two) and auto(big) == e_off
    # neither fits without the mode: the mode's line, for the pair (ComfyUI batches them when that fits)
    free["v"] = e_off - 1
    assert auto(two) == on(two) < off(two)


def test_auto_switches_on_when_the_step_would_not_fit(pack, sd15, counts, small_chunks, monkeypatch, one_thread):
    import comfy.model_management as mm
    x, c = _sd15_inputs(2, 16, 24)
    auto = _apply(pack, sd15["unet"], sd15["ck"], "auto")
    est = auto.object_patches["memory_required"]
    ref = _run(auto, x, c_crossattn=c)
    assert counts["park"] == 0  # plenty of memory here: off
    real = mm.get_free_memory
    small = est(list(x.shape), low_memory=False) * 0.9

    def free(dev=None, torch_free_too=False):
        # a card with little free memory, as our estimate asks (one argument); ComfyUI's CPU attention, which
        # sizes its own chunks from (free, torch free), keeps the real figures so that both runs compute alike
        return real(dev, True) if torch_free_too else small
    monkeypatch.setattr(mm, "get_free_memory", free)
    low = _run(auto, x, c_crossattn=c)
    assert counts["park"] == 12 and counts["banded"] >= 3  # the smallest norms run unbanded at this size:
    assert counts["chunked_gn"] + counts["banded"] == 2 * 22 + 3  # every norm-SiLU-conv one way or the other
    assert torch.equal(low, ref)


def test_node_input(pack):
    node = pack.NODE_CLASS_MAPPINGS["ApplyLinFusion"]
    spec = node.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "linfusion"]
    choices, opts = spec["optional"]["low_memory"]
    assert choices == ["auto", "on", "off"] and opts["default"] == "auto" and opts["tooltip"]
    import inspect
    assert inspect.signature(node.apply).parameters["low_memory"].default == "auto"
