"""Independent float64 references for the tests: LinFusion's formulas (paper and authors' code, as written out in
the team's reference notes) in plain float64 torch, sharing no code with the pack."""
from __future__ import annotations

import torch


def layer_f64(t: dict, x: torch.Tensor, heads: int, base=None) -> torch.Tensor:
    """One LinFusion layer, the reference-doc formula written out in float64 from a file's tensors ``t`` (one
    layer's, named as in the file). ``base``: (to_q, to_k, to_v, to_out.0 weight, to_out.0 bias) used when ``t``
    has no projections of its own (or to give other ones)."""
    d = {k: v.double() for k, v in t.items()}
    x = x.double()

    def mlp(p, u):
        h = u @ d[f"{p}.0.weight"].T + d[f"{p}.0.bias"]
        h = torch.nn.functional.layer_norm(h, h.shape[-1:], d[f"{p}.1.weight"], d[f"{p}.1.bias"], eps=1e-5)
        h = torch.where(h > 0, h, 0.01 * h)
        return h @ d[f"{p}.3.weight"].T + d[f"{p}.3.bias"]

    wq, wk, wv, wo, bo = (d["to_q.weight"], d["to_k.weight"], d["to_v.weight"], d["to_out.0.weight"],
                          d["to_out.0.bias"]) if base is None else tuple(w.double() for w in base)
    q = (x + mlp("to_q_", x)) @ wq.T
    k = (x + mlp("to_k_", x)) @ wk.T
    v = x @ wv.T
    B, N, C = q.shape
    hd = C // heads
    out = torch.empty_like(q)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        fq = torch.where(q[..., s] > 0, q[..., s] + 1, torch.exp(q[..., s]))
        fk = torch.where(k[..., s] > 0, k[..., s] + 1, torch.exp(k[..., s]))
        kv = torch.einsum("bnd,bne->bde", fk, v[..., s]) / N
        den = torch.einsum("bnd,bd->bn", fq, fk.mean(1)) + 1e-4
        out[..., s] = torch.einsum("bnd,bde->bne", fq, kv) / den[..., None]
    return out @ wo.T + bo
