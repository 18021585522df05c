"""API-format prompts built in code for the tests (the bundled workflows live in workflows/)."""
from __future__ import annotations


class Graph:
    """A tiny builder: ``g.add("KSampler", model=..., ...)`` returns a node id; ``g.out(id, slot)`` a link."""

    def __init__(self):
        self.nodes = {}

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    @staticmethod
    def out(nid: str, slot: int = 0) -> list:
        return [nid, slot]

    def prompt(self) -> dict:
        return self.nodes


def txt2img(g: Graph, model, clip, vae=None, width=64, height=64, steps=2, seed=0, cfg=7.0, text="a photo of a cat",
            sampler="euler", scheduler="normal", prefix=None, save_latent=None, batch=1):
    pos = g.add("CLIPTextEncode", text=text, clip=clip)
    neg = g.add("CLIPTextEncode", text="", clip=clip)
    lat = g.add("EmptyLatentImage", width=width, height=height, batch_size=batch)
    ks = g.add("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
               positive=g.out(pos), negative=g.out(neg), latent_image=g.out(lat), denoise=1.0)
    if save_latent:
        g.add("SaveLatent", samples=g.out(ks), filename_prefix=save_latent)
    if prefix and vae is not None:
        dec = g.add("VAEDecode", samples=g.out(ks), vae=vae)
        g.add("SaveImage", images=g.out(dec), filename_prefix=prefix)
    return ks


def checkpoint(g: Graph, ckpt_name: str):
    ck = g.add("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    return g.out(ck, 0), g.out(ck, 1), g.out(ck, 2)


def linfusion(g: Graph, model, linfusion_name: str, softmax_below_tokens=None):
    lf = g.add("LinFusionLoader", linfusion_name=linfusion_name)
    inputs = {"model": model, "linfusion": g.out(lf)}
    if softmax_below_tokens is not None:
        inputs["softmax_below_tokens"] = softmax_below_tokens
    return g.out(g.add("ApplyLinFusion", **inputs))
