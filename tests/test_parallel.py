"""Spatial parallelism (linfusion_core.parallel) on CPU: gloo ranks on loopback, forked from this process so they
share one copy of the weights, each running ComfyUI's own UNet module tree on its band of the latent. The
reference is the same UNet run whole in this process, outside any parallel context.

True-size SD-1.5 and SD-XL UNets (generated weights, fp16 storage computed in fp32 through ComfyUI's manual
cast), LinFusion applied by the pack's own Apply LinFusion code, small latents, odd heights."""
from __future__ import annotations

import pytest
import torch

from harness import controlnet_fixtures, fixtures, linfusion_fixtures
from harness.parallel_ranks import run_ranks

TOL = 1e-5  # max |parallel - single| / max |single|, fp32


def _model(pack, family, tmp_path_factory, softmax_below_tokens=0, lf_seed=5):
    import comfy.model_management as mm
    m = fixtures.load_unet(family, {"dtype": torch.float16})
    assert m.model.manual_cast_dtype == torch.float32  # fp16 storage, fp32 compute on the CPU
    path = linfusion_fixtures.write(family, tmp_path_factory.mktemp("lf") / f"{family}.safetensors", layout="file",
                                    seed=lf_seed, projections=family == "sd15")
    ck = pack.linfusion_core.checkpoint.load_checkpoint(path)
    patched = pack.nodes.patching.apply_linfusion(m, ck, softmax_below_tokens)
    mm.load_models_gpu([patched])
    return patched


def _inputs(family, batch, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    t = torch.tensor([500.0, 20.0][:batch])
    if family == "sdxl":
        c = torch.randn(batch, 77, 2048, generator=g)
        y = torch.randn(batch, 2816, generator=g)
    else:
        c = torch.randn(batch, 77, 768, generator=g)
        y = None
    return x, t, c, y


def _par(pack):
    """The pack's parallel module, from the pack as ComfyUI imports it (its LinFusionAttention is the class the
    patched model holds)."""
    import importlib
    return importlib.import_module(f"{pack.__name__}.linfusion_core.parallel")


def _parallel(pack, unet, x, t, c, y, ranks, control=None, gather=True):
    par = _par(pack)
    bands = par.split_bands(x.shape[-2], x.shape[-1], ranks, par.unet_align(unet))

    def rank_fn(rank, world):
        traffic = par.Traffic()
        out = par.unet_step(unet, x, t, c, bands=bands, y=y, control=control, traffic=traffic, gather=gather)
        return out, traffic.as_dict()

    res = run_ranks(rank_fn, ranks, timeout=900)
    return bands, res


def _reference_with_inventory(unet, *args):
    """The single-process step, recording every spatial conv's input (channels, width) and every LinFusion layer's
    (heads, head size) on the way: the geometry the traffic formula is computed from."""
    convs, states, hooks = [], [], []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, a: convs.append((a[0].shape[1], a[0].shape[-1], mod.padding[0]))))
        elif type(m).__name__ == "LinFusionAttention":
            hooks.append(m.register_forward_pre_hook(lambda mod, a: states.append((mod.heads, mod.dim_head))))
    try:
        with torch.no_grad():
            out = unet(*args)
    finally:
        for h in hooks:
            h.remove()
    return out, convs, states


def _expected_bytes(convs, states, batch, ranks, rank, n_groupnorms=0):
    """Bytes ``rank`` sends in one step, from the geometry alone (fp32): halo rows to each neighbour at every
    spatial conv, the ring all-reduce of every LinFusion state and GroupNorm statistics, the final gather."""
    neighbours = (rank > 0) + (rank < ranks - 1)
    halo = sum(neighbours * p * c * w * batch * 4 for c, w, p in convs)
    ring = 2 * (ranks - 1) / ranks
    state = sum(int(ring * batch * h * d * (d + 1) * 4) for h, d in states)
    return halo, state


def _err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def sd15(pack, tmp_path_factory):
    import comfy.model_management as mm
    m = _model(pack, "sd15", tmp_path_factory)
    yield m
    mm.unload_all_models()
    mm.soft_empty_cache()


@pytest.fixture(scope="module")
def sdxl(pack, tmp_path_factory):
    import comfy.model_management as mm
    m = _model(pack, "sdxl", tmp_path_factory)
    yield m
    mm.unload_all_models()
    mm.soft_empty_cache()


# ------------------------------------------------------------------ a small UNet-shaped net, no ComfyUI needed

class _Softmax(torch.nn.Module):
    """A stock self-attention layer, ComfyUI's CrossAttention interface."""

    def __init__(self, c, heads):
        super().__init__()
        self.heads, self.dim_head = heads, c // heads
        self.to_q = torch.nn.Linear(c, c, bias=False)
        self.to_k = torch.nn.Linear(c, c, bias=False)
        self.to_v = torch.nn.Linear(c, c, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(c, c))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        B, N, C = q.shape
        h = self.heads
        att = torch.softmax((q.view(B, N, h, -1).transpose(1, 2) @ k.view(B, -1, h, C // h).permute(0, 2, 3, 1))
                            / (C // h) ** 0.5, dim=-1)
        return self.to_out((att @ v.view(B, -1, h, C // h).transpose(1, 2)).transpose(1, 2).reshape(B, N, C))


class _Toy(torch.nn.Module):
    """conv, GroupNorm, two stride-2 convs, a LinFusion layer, a stock softmax layer, nearest upsampling to the skip
    tensors' sizes (odd heights), a dilated conv: every kind of layer the parallel context adapts."""

    def __init__(self, c=32, softmax_below_tokens=0):
        super().__init__()
        from linfusion_core.layer import LinFusionAttention, LinFusionWeights
        nn = torch.nn
        self.cin, self.gn = nn.Conv2d(4, c, 3, padding=1), nn.GroupNorm(8, c)
        self.down, self.down2 = nn.Conv2d(c, c, 3, stride=2, padding=1), nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.attn1 = LinFusionAttention(_Softmax(c, 4), LinFusionWeights(c, c // 2, False), softmax_below_tokens)
        self.deep = nn.Module()
        self.deep.attn1 = _Softmax(c, 4)
        self.up, self.out = nn.Conv2d(2 * c, c, 3, padding=1), nn.Conv2d(c, 4, 3, padding=2, dilation=2)

    @staticmethod
    def _tokens(h, layer):
        b, c, hh, ww = h.shape
        t = h.movedim(1, 3).flatten(1, 2)
        return (t + layer(t)).reshape(b, hh, ww, c).movedim(3, 1)

    def forward(self, x, t=None, context=None, y=None, control=None, transformer_options=None):
        h0 = torch.nn.functional.silu(self.gn(self.cin(x)))
        h1 = self._tokens(self.down(h0), self.attn1)
        h2 = self._tokens(self.down2(h1), self.deep.attn1)
        h = torch.nn.functional.interpolate(h2, size=h1.shape[-2:], mode="nearest") + h1
        h = torch.nn.functional.interpolate(h, size=h0.shape[-2:], mode="nearest")
        return self.out(self.up(torch.cat([h, h0], 1)))


@pytest.mark.parametrize("softmax_below_tokens", [0, 1000])
@pytest.mark.parametrize("ranks,h,w", [(2, 16, 8), (2, 13, 6), (4, 21, 5)])
def test_small_net_equals_single_process(ranks, h, w, softmax_below_tokens):
    from linfusion_core import parallel as par
    torch.manual_seed(0)
    net = _Toy(softmax_below_tokens=softmax_below_tokens).eval()
    x = torch.randn(2, 4, h, w)
    with torch.no_grad():
        want = net(x)
    bands = par.split_bands(h, w, ranks, par.unet_align(net))

    def rank_fn(rank, world):
        traffic = par.Traffic()
        return par.unet_step(net, x, None, bands=bands, traffic=traffic), traffic.as_dict()

    res = run_ranks(rank_fn, ranks, timeout=120)
    err = _err(res[0][0], want)
    assert err < TOL, err
    kinds = set(res[1][1]["bytes"])
    assert {"halo", "groupnorm", "all_gather", "gather"} <= kinds
    assert ("linfusion_state" in kinds) == (softmax_below_tokens == 0)
    # sharded output: each rank keeps its band
    res = run_ranks(lambda r, n: par.unet_step(net, x, None, bands=bands, gather=False), ranks, timeout=120)
    assert _err(torch.cat(res, dim=-2), want) < TOL


def test_rank_failure_ends_the_others():
    """A rank that raises ends the run at once with its error; the others (waiting in a collective) are killed."""
    import torch.distributed as dist

    def rank_fn(rank, world):
        if rank == 1:
            raise ValueError("rank 1 gives up")
        dist.barrier()

    with pytest.raises(RuntimeError, match="rank 1 gives up"):
        run_ranks(rank_fn, 2, timeout=60)


def test_split_bands():
    from linfusion_core import parallel as par
    b = par.split_bands(33, 16, 4, 8)
    assert b.starts == (0, 8, 16, 24, 33)
    assert [b.rows(3, lvl) for lvl in range(4)] == [(24, 33), (12, 17), (6, 9), (3, 5)]
    assert b.size(3) == (5, 2)
    b = par.split_bands(25, 16, 4, 8)  # as many units as ranks: the last band is one row
    assert b.starts == (0, 8, 16, 24, 25) and [b.rows(3, lvl) for lvl in range(4)] == [(24, 25), (12, 13), (6, 7), (3, 4)]
    assert par.split_bands(64, 8, 2, 8).starts == (0, 32, 64)
    with pytest.raises(ValueError, match="too few for 4 ranks"):
        par.split_bands(24, 16, 4, 8)


@pytest.mark.parametrize("ranks,h,w", [(2, 24, 16), (2, 17, 16), (4, 25, 16)])
def test_sd15_step_equals_single_process(pack, sd15, ranks, h, w):
    unet = sd15.model.diffusion_model
    x, t, c, y = _inputs("sd15", 2, h, w)
    want, convs, states = _reference_with_inventory(unet, x, t, c, None, None, {})
    bands, res = _parallel(pack, unet, x, t, c, y, ranks)
    got = res[0][0]
    assert all(r[0] is None for r in res[1:])
    err = _err(got, want)
    traffic = [r[1]["total"] for r in res]
    print(f"sd15 {ranks} ranks, latent {h}x{w}, bands {bands.starts}: max rel err {err:.2e}, bytes sent per rank "
          f"{traffic}")
    assert got.shape == want.shape
    assert err < TOL, err
    assert set(res[1][1]["bytes"]) >= {"halo", "groupnorm", "linfusion_state"}
    assert "all_gather" not in res[1][1]["bytes"]
    # the counters against the geometry: halo bytes grow with the width only, the states are fixed
    for r in range(ranks):
        halo, state = _expected_bytes(convs, states, 2, ranks, r)
        assert res[r][1]["bytes"]["halo"] == halo
        assert abs(res[r][1]["bytes"]["linfusion_state"] - state) <= len(states)
    per_col = sum(2 * p * c * cw / w for c, cw, p in convs)
    print(f"sd15: {len(convs)} spatial convs, halo per interior rank = {per_col:.0f} x batch x latent width x "
          f"bytes/element; {len(states)} LinFusion states = {_expected_bytes(convs, states, 1, 2, 0)[1]} B a sample "
          f"(2 ranks, ring)")


@pytest.mark.parametrize("ranks,h,w", [(2, 12, 8), (4, 17, 8)])
def test_sdxl_step_equals_single_process(pack, sdxl, ranks, h, w):
    unet = sdxl.model.diffusion_model
    x, t, c, y = _inputs("sdxl", 1, h, w)
    want, convs, states = _reference_with_inventory(unet, x, t, c, y, None, {})
    bands, res = _parallel(pack, unet, x, t, c, y, ranks)
    got = res[0][0]
    err = _err(got, want)
    for r in range(ranks):
        halo, state = _expected_bytes(convs, states, 1, ranks, r)
        assert res[r][1]["bytes"]["halo"] == halo
    per_col = sum(2 * p * c * cw / w for c, cw, p in convs)
    print(f"sdxl: {len(convs)} spatial convs, halo per interior rank = {per_col:.0f} x batch x latent width x "
          f"bytes/element; {len(states)} LinFusion states = {_expected_bytes(convs, states, 1, 2, 0)[1]} B a sample "
          f"(2 ranks, ring)")
    print(f"sdxl {ranks} ranks, latent {h}x{w}, bands {bands.starts}: max rel err {err:.2e}, bytes sent per rank "
          f"{[r[1]['total'] for r in res]}")
    assert err < TOL, err


def test_sd15_sampler_steps_kept_sharded_equal_single_process(pack, sd15):
    """Three Euler steps with every rank keeping its band between steps; only the final latent is gathered."""
    par = _par(pack)
    unet = sd15.model.diffusion_model
    x, _, c, _ = _inputs("sd15", 1, 24, 16, seed=3)
    sigmas = [14.6, 6.0, 2.0, 0.0]
    ts = [900.0, 600.0, 300.0]

    def euler(step, latent, band=None):
        for i, t in enumerate(ts):
            eps = step(latent * (1 / (sigmas[i] ** 2 + 1) ** 0.5), torch.tensor([t]))
            latent = latent + (sigmas[i + 1] - sigmas[i]) * eps
        return latent

    with torch.no_grad():
        want = euler(lambda z, t: unet(z, t, c, None, None, {}), x * sigmas[0])
    bands = par.split_bands(24, 16, 2, par.unet_align(unet))

    def rank_fn(rank, world):
        import torch.distributed as dist
        traffic = par.Traffic()
        band = euler(lambda z, t: par.unet_step(unet, z, t, c, bands=bands, gather=False, traffic=traffic),
                     bands.shard(x, rank) * sigmas[0])
        per_step = traffic.total / len(ts)
        out = par.Comm(None, traffic).gather_rows(band, bands)
        dist.barrier()
        return out, per_step

    res = run_ranks(rank_fn, 2, timeout=900)
    err = _err(res[0][0], want)
    print(f"sd15 3 Euler steps, 2 ranks kept sharded: max rel err {err:.2e}, bytes per step per rank "
          f"{[r[1] for r in res]}")
    assert err < TOL, err


@pytest.fixture(scope="module")
def sd15_controlnet(comfy_inproc):
    import comfy.controlnet
    net = comfy.controlnet.load_controlnet(str(controlnet_fixtures.ensure_controlnet("sd15", "original")))
    yield net.control_model.float()
    del net


def test_sd15_step_with_controlnet_equals_single_process(pack, sd15, sd15_controlnet):
    """A stock ControlNet (softmax self-attention: its keys and values are all-gathered) run on the bands too,
    its hint cut into pixel bands, its residuals added to the UNet's bands."""
    par = _par(pack)
    unet, cnet = sd15.model.diffusion_model, sd15_controlnet
    x, t, c, _ = _inputs("sd15", 1, 17, 8, seed=4)
    hint = torch.rand(1, 3, 17 * 8, 8 * 8, generator=torch.Generator().manual_seed(5))

    def control_of(out):
        return {"middle": list(out["middle"]), "output": list(out["output"])}

    with torch.no_grad():
        want = unet(x, t, c, None, control_of(cnet(x, hint, t, c)), {})
    bands = par.split_bands(17, 8, 2, par.unet_align(unet))

    def rank_fn(rank, world):
        traffic = par.Traffic()
        with par.SpatialParallel(cnet, bands, traffic=traffic):
            control = control_of(cnet(bands.shard(x, rank), bands.shard(hint, rank, scale=8), t, c))
        out = par.unet_step(unet, x, t, c, bands=bands, control=control, control_is_sharded=True, traffic=traffic)
        return out, traffic.as_dict()

    res = run_ranks(rank_fn, 2, timeout=900)
    err = _err(res[0][0], want)
    print(f"sd15 + ControlNet, 2 ranks: max rel err {err:.2e}, traffic rank 1 {res[1][1]}")
    assert err < TOL, err
    assert res[1][1]["bytes"]["all_gather"] > 0  # the ControlNet's own softmax self-attention
