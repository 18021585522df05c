"""Masks in a LinFusion layer (linfusion_core/masks.py), in-process around ComfyUI's own CrossAttention.

Key-padding masks in every form ComfyUI's attention functions take (boolean or additive, from (keys,) to
(batch, heads, queries, keys)) run linear attention over the kept keys: checked against an independent float64
formula, with batch elements and heads masked differently. Any other mask runs the base layer's softmax
attention, with one warning per layer naming the layer and the reason."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from harness.linfusion_fixtures import layer_tensors

B, N, C, H = 2, 48, 64, 4  # batch, tokens, channels, heads
D = C // H
TOL = 1e-5  # fp32 layer against the float64 formula, relative to the output's largest value


@pytest.fixture(scope="module")
def mods(comfy_inproc, pack):
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    return {"attention": attention, "ops": comfy.ops, "layer": pack.linfusion_core.layer,
            "checkpoint": pack.linfusion_core.checkpoint, "masks": pack.linfusion_core.masks}


def make_layer(mods, projections=True, seed=0, label="test.attn1", dtype=torch.float32, softmax_below_tokens=0):
    g = torch.Generator().manual_seed(seed)
    base = mods["attention"].CrossAttention(C, heads=H, dim_head=D, operations=mods["ops"].disable_weight_init)
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if name.endswith("bias") else C ** -0.5))
    base = base.to(dtype)
    lw = mods["checkpoint"].LayerWeights(0, C, C, projections, tensors=layer_tensors(C, C, g, projections))
    return mods["layer"].build_layer(base, lw, dtype=dtype, softmax_below_tokens=softmax_below_tokens, label=label)


def inputs(seed=1, dtype=torch.float32):
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------- float64 formulas
def _weights(layer):
    lf = {k: v.double() for k, v in layer.linfusion.state_dict().items()}
    base = {k: v.double() for k, v in layer._base.state_dict().items()}
    return lf, (lf if layer.linfusion.own_projections else base), base


def _mlp(w, name, u):
    h = F.linear(u, w[f"{name}.0.weight"], w[f"{name}.0.bias"])
    h = F.layer_norm(h, (h.shape[-1],), w[f"{name}.1.weight"], w[f"{name}.1.bias"], eps=1e-5)
    return F.linear(F.leaky_relu(h, 0.01), w[f"{name}.3.weight"], w[f"{name}.3.bias"])


def masked_reference(layer, x, keep, eps=1e-4):
    """The layer in float64 with keys masked out: per sample b and head h, over the kept keys K (n of them),
    out = phi(q) (phi(k_K)^T v_K / n) / (phi(q) . mean_K phi(k) + eps); zeros where no key is kept."""
    lf, proj, _ = _weights(layer)
    x = x.double()
    q = F.linear(x + _mlp(lf, "to_q_", x), proj["to_q.weight"])
    k = F.linear(x + _mlp(lf, "to_k_", x), proj["to_k.weight"])
    v = F.linear(x, proj["to_v.weight"])
    out = torch.zeros_like(q)
    phi = lambda u: F.elu(u) + 1  # noqa: E731
    for b in range(x.shape[0]):
        for h in range(H):
            kept = keep[b, h].nonzero().squeeze(1)
            n = kept.numel()
            if n == 0:
                continue
            s = slice(h * D, (h + 1) * D)
            qf, kf, vk = phi(q[b, :, s]), phi(k[b, kept, s]), v[b, kept, s]
            out[b, :, s] = (qf @ (kf.T @ vk) / n) / (qf @ kf.mean(0) + eps)[:, None]
    return F.linear(out, proj["to_out.0.weight"], proj["to_out.0.bias"])


def softmax_reference(layer, x, bias):
    """The base layer's softmax attention in float64 with an additive bias broadcast to (B, H, N, N)."""
    _, _, w = _weights(layer)
    x = x.double()
    q, k, v = (F.linear(x, w[f"to_{p}.weight"]).view(B, N, H, D).transpose(1, 2) for p in "qkv")
    att = torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5 + bias.double(), dim=-1)
    out = (att @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, w["to_out.0.weight"], w["to_out.0.bias"])


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# ---------------------------------------------------------------------------------------------- key-padding masks
def random_keep(seed, per_batch, per_head):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B if per_batch else 1, H if per_head else 1, N, generator=g) < 0.5
    keep[..., seed % N] = True  # no row without a kept key here (that case has its own test)
    return keep.expand(B, H, N)


def additive(keep, neg):
    return torch.zeros(keep.shape).masked_fill(~keep, neg)


# (id, mask differs per batch element, per head, keep (B, H, keys) -> mask in that form)
FORMS = [
    ("bool-keys", False, False, lambda k: k[0, 0]),
    ("bool-batch-keys", True, False, lambda k: k[:, 0]),
    ("bool-queries-keys", False, False, lambda k: k[0, 0].expand(N, N)),
    ("bool-batch-queries-keys", True, False, lambda k: k[:, 0, None].expand(B, N, N).contiguous()),
    ("bool-1-heads-1-keys", False, True, lambda k: k[:1, :, None]),
    ("bool-batch-heads-queries-keys", True, True, lambda k: k[:, :, None].expand(B, H, N, N)),
    ("inf-keys", False, False, lambda k: additive(k[0, 0], float("-inf"))),
    ("inf-batch-1-keys", True, False, lambda k: additive(k[:, 0], float("-inf"))[:, None]),
    ("finfo-min-batch-1-1-keys", True, False,
     lambda k: additive(k[:, 0], torch.finfo(torch.float32).min)[:, None, None]),
    ("minus-1e4-batch-heads-queries-keys", True, True,
     lambda k: additive(k, -10000.0)[:, :, None].expand(B, H, N, N)),
    ("inf-fp16-batch-1-1-keys", True, False, lambda k: additive(k[:, 0], float("-inf")).half()[:, None, None]),
]


@pytest.mark.parametrize("projections", [True, False], ids=["own-projections", "base-projections"])
@pytest.mark.parametrize("form", FORMS, ids=[f[0] for f in FORMS])
def test_key_padding_mask_runs_linear_over_the_kept_keys(mods, caplog, form, projections):
    _, per_batch, per_head, make = form
    layer = make_layer(mods, projections)
    keep = random_keep(len(form[0]), per_batch, per_head)
    if per_batch:
        assert not torch.equal(keep[0], keep[1])
    x = inputs()
    with caplog.at_level(logging.WARNING, logger="LinFusion"), torch.no_grad():
        got = layer(x, mask=make(keep))
    assert not [r for r in caplog.records if r.name == "LinFusion"], caplog.text  # ran linear, no fallback
    assert rel_err(got, masked_reference(layer, x, keep)) < TOL
    # And it is not the unmasked layer.
    with torch.no_grad():
        assert rel_err(layer(x), masked_reference(layer, x, keep)) > 1e-3


def test_mask_that_keeps_every_key_changes_nothing(mods):
    layer, x = make_layer(mods), inputs()
    with torch.no_grad():
        plain = layer(x)
        assert torch.equal(layer(x, mask=torch.ones(N, dtype=torch.bool)), plain)
        assert torch.equal(layer(x, mask=torch.zeros(B, 1, 1, N)), plain)
    keep = torch.ones(B, H, N, dtype=torch.bool)
    assert rel_err(plain, masked_reference(layer, x, keep)) < TOL


def test_shared_masks_collapse_to_one_call(mods):
    kp = mods["masks"].key_padding_keep
    row = torch.rand(N) < 0.5
    keep, why = kp(row.expand(B, H, N, N), B, H, N, N)
    assert why is None and keep.shape == (1, 1, N) and torch.equal(keep[0, 0], row)
    keep, why = kp(torch.stack([row, ~row])[:, None, None], B, H, N, N)
    assert why is None and keep.shape == (B, 1, N)


def test_fully_masked_batch_element_gives_zero_attention_not_nan(mods):
    """PyTorch's scaled_dot_product_attention (ComfyUI's attention_pytorch) gives zeros for a row with no key
    kept; the linear path does the same, so that batch element's output is to_out's bias."""
    layer, x = make_layer(mods), inputs()
    keep = random_keep(3, True, False).clone()
    keep[1] = False
    for mask in (keep[:, 0], additive(keep[:, 0], float("-inf"))[:, None, None]):
        with torch.no_grad():
            got = layer(x, mask=mask)
        assert torch.isfinite(got).all()
        assert torch.equal(got[1], layer.linfusion.to_out[0].bias.expand(N, C))
        assert rel_err(got, masked_reference(layer, x, keep)) < TOL
    q = torch.randn(1, H, N, D)
    sdpa = F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 1, N, dtype=torch.bool))
    assert torch.equal(sdpa, torch.zeros_like(sdpa))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_few_kept_keys_in_half_precision(mods, dtype):
    """3 of 48 keys kept: the rescaling by the kept count neither overflows nor loses the output."""
    layer, x = make_layer(mods, dtype=dtype), inputs(dtype=dtype)
    keep = torch.zeros(B, H, N, dtype=torch.bool)
    keep[0, :, [1, 7, 30]] = True
    keep[1, :, [0, 5, 47]] = True
    with torch.no_grad():
        got = layer(x, mask=keep[:, 0])
    assert torch.isfinite(got).all()
    assert rel_err(got, masked_reference(layer, x, keep)) < 1e-2  # measured: 6e-4 fp16, 4e-3 bf16


# ---------------------------------------------------------------------------------------------- other masks
def _linfusion_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "LinFusion" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("kind", ["soft-bias", "per-query"])
def test_other_masks_fall_back_to_softmax_with_one_warning_per_layer(mods, caplog, kind):
    g = torch.Generator().manual_seed(5)
    if kind == "soft-bias":  # values between 0 and -inf weight keys: softmax only
        mask = bias = -3 * torch.rand(B, 1, N, N, generator=g)
        reason = "values other than 0 and -inf"
    else:  # a mask that differs between queries (causal): not a key-padding mask. Additive, because ComfyUI's
        # CPU attention (sub_quad) adds boolean masks as numbers instead of masking with them.
        mask = bias = torch.zeros(N, N).masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
        reason = "differs between queries"
    a = make_layer(mods, label="input_blocks.1.1.transformer_blocks.0.attn1")
    b = make_layer(mods, label="output_blocks.4.1.transformer_blocks.0.attn1", seed=1)
    x = inputs()
    with caplog.at_level(logging.WARNING, logger="LinFusion"), torch.no_grad():
        for _ in range(3):
            got = a(x, mask=mask)
            b(x, mask=mask)
        stock = a._base(x, mask=mask)
    msgs = _linfusion_warnings(caplog)
    assert len(msgs) == 2, msgs
    assert "input_blocks.1.1.transformer_blocks.0.attn1" in msgs[0] and reason in msgs[0], msgs
    assert "output_blocks.4.1.transformer_blocks.0.attn1" in msgs[1] and reason in msgs[1], msgs
    assert "softmax" in msgs[0]
    assert torch.equal(got, stock)  # the base layer's own softmax path
    assert rel_err(got, softmax_reference(a, x, bias)) < TOL


def test_mask_below_the_softmax_threshold_runs_softmax_silently(mods, caplog):
    layer, x = make_layer(mods, softmax_below_tokens=N + 1), inputs()
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    with caplog.at_level(logging.WARNING, logger="LinFusion"), torch.no_grad():
        assert torch.equal(layer(x, mask=mask), layer._base(x, mask=mask))
    assert not _linfusion_warnings(caplog)


def test_key_padding_keep_names_the_reason(mods):
    kp = mods["masks"].key_padding_keep
    assert "dtype" in kp(torch.ones(N, dtype=torch.int64), B, H, N, N)[1]
    assert "does not broadcast" in kp(torch.ones(N + 1, dtype=torch.bool), B, H, N, N)[1]
    assert "does not broadcast" in kp(torch.ones(3, 1, N, dtype=torch.bool), B, H, N, N)[1]
    assert "dimensions" in kp(torch.ones(1, 1, 1, 1, N, dtype=torch.bool), B, H, N, N)[1]
    assert "values other than" in kp(torch.full((N,), float("nan")), B, H, N, N)[1]
