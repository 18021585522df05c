"""LinFusionVAEDecodeTiled / LinFusionVAEEncodeTiled: one-pass tiled VAE with exact GroupNorm (linfusion_core.vae_tiled).

Drop-in for ComfyUI's VAE Decode (Tiled) / VAE Encode (Tiled) on SD-1.x, SD-2.x and SD-XL VAEs: same inputs first
(``samples``/``pixels``, ``vae``, ``tile_size``, ``overlap``), same outputs. Where ComfyUI runs three tilings and
averages them (three times the work, every tile with its own GroupNorm statistics), these run each convolution once
with halos and global statistics; only the mid-block attention is computed per tile.
"""
from __future__ import annotations

import logging

import torch

from ..linfusion_core import vae_tiled
from .comfy_ops import weight_and_bias

log = logging.getLogger("LinFusion")

_TILE_TIP = ("Tile side in image pixels. Convolutions and GroupNorms give the untiled result at any tile size; the "
             "tile only bounds GPU memory and sets the window of the VAE's mid-block attention (twice the tile; "
             "larger = closer to untiled). An image no larger than one tile is run whole (the untiled result). "
             "Lower it if the VAE runs out of GPU memory.")
_OVERLAP_TIP = ("Extra context, in image pixels, that each attention tile sees on every side (keys and values). "
                "Nothing else overlaps: there is no blending and no repeated pass.")
_VAE_TIP = "An SD-1.x, SD-2.x or SD-XL VAE."
# The inputs after the picture, the same for both nodes (and in ComfyUI's tiled nodes' order).
_TILING = {
    "tile_size": ("INT", {"default": 1024, "min": 256, "max": 8192, "step": 64, "tooltip": _TILE_TIP}),
    "overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 32, "tooltip": _OVERLAP_TIP}),
}


def _norm_params(norm, like):
    """GroupNorm weight and bias in float32 on the compute device, as ComfyUI's op would read them (cast, streamed
    under lowvram or DynamicVRAM); copies, so they stay valid after ComfyUI's cast context ends."""
    like32 = torch.empty((), dtype=torch.float32, device=like.device)
    with weight_and_bias(norm, like32) as (w, b):
        return (None if w is None else w.clone()), (None if b is None else b.clone())


class _Progress:
    def __init__(self, total):
        import comfy.utils
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, ticks):
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(min(ticks, self.bar.total))


def _available_ram():
    try:
        import psutil
        return psutil.virtual_memory().available
    except Exception:  # no psutil: do not guess
        return None


def _check(vae, what):
    vae.throw_exception_if_invalid()
    try:
        vae_tiled.check_supported(vae.first_stage_model, what)
    except vae_tiled.UnsupportedVAE as e:
        raise ValueError(f"LinFusion tiled VAE: {e}. It works with the VAEs of SD-1.x, SD-2.x and SD-XL; use "
                         f"ComfyUI's VAE {'Decode' if what == 'decode' else 'Encode'} (Tiled) for this one.") from None


def _prepare(vae, what, shape, tile_size, overlap, memory_fn):
    """Loads the VAE, and returns a progress callback, or None when the whole-image activations this needs do not
    fit in free RAM (the caller then uses ComfyUI's three-pass tiling, which keeps only the output)."""
    import comfy.model_management as mm

    def make_plan(keep):
        return vae_tiled.plan(vae.first_stage_model, tuple(shape), what=what, tile=tile_size, overlap=overlap,
                              dtype=vae.vae_dtype, keep_upsampled=keep)
    free = _available_ram()
    plan, keep = make_plan(None), None
    if what == "decode":  # the faster variant (the last upsampled map stored, not recomputed) when RAM is plentiful
        fast = make_plan(True)
        if free is None or fast["kept_bytes"] < 0.5 * free:
            plan, keep = fast, True
    if free is not None and plan["kept_bytes"] > 0.9 * free:
        log.warning("LinFusion tiled VAE: exact tiling keeps %.1f GB of activations in RAM here and %.1f GB are "
                    "free; falling back to ComfyUI's three-pass tiled %s (per-tile GroupNorm, seams possible)",
                    plan["kept_bytes"] / 1e9, free / 1e9, what)
        return None, None, None
    # Memory for one tile (the whole image is never on the device).
    memory = memory_fn(shape, vae.vae_dtype)
    mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=getattr(vae, "disable_offload", False))
    # The kept activations stay on the GPU when they fit with room to spare (no PCIe round trips), else in RAM.
    park = None
    device = torch.device(vae.device)
    if device.type != "cpu":
        try:
            if plan["kept_bytes"] + 2 * memory < 0.8 * mm.get_free_memory(device):
                park = device
        except Exception:
            park = None
    return _Progress(plan["steps"]), park, keep


def _on_upcast(dtype):
    log.warning("LinFusion tiled VAE: fp16 overflowed (non-finite activations, as the SD-XL VAE does in fp16); "
                "running again in %s", str(dtype).replace("torch.", ""))


class LinFusionVAEDecodeTiled:
    CATEGORY = "latent/LinFusion"
    DESCRIPTION = ("Decodes latents tile by tile in one pass. GroupNorm statistics are taken over the whole image and "
                   "every convolution sees its neighbours (halos), so the result matches an untiled decode apart "
                   "from the mid-block attention, which runs per tile. Several times faster than VAE Decode (Tiled), "
                   "which decodes three tilings and averages them. SD-1.x, SD-2.x and SD-XL VAEs.")
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to decode."}),
            "vae": ("VAE", {"tooltip": _VAE_TIP}),
            **_TILING,
        }}

    def decode(self, samples, vae, tile_size=1024, overlap=64):
        latent = samples["samples"]
        if latent.ndim != 4:
            raise ValueError(f"LinFusion VAE Decode (Tiled) takes image latents (batch, channels, height, width); "
                             f"got shape {tuple(latent.shape)}")
        t = max(1, tile_size // 8)
        _check(vae, "decode")
        if max(latent.shape[-2:]) <= t:  # one tile: the untiled decode is the exact result, at no extra memory
            return (vae.decode(latent),)
        progress, park, keep = _prepare(vae, "decode", latent.shape, tile_size, overlap,
                                  lambda shape, dt: vae.memory_used_decode((1, shape[1], t, t), dt))
        if progress is None:
            ov = min(overlap, tile_size // 4) // 8
            return (vae.decode_tiled(latent, tile_x=t, tile_y=t, overlap=ov),)
        out = vae_tiled.decode(vae.first_stage_model, latent, tile=tile_size, overlap=overlap, device=vae.device,
                               dtype=vae.vae_dtype, out_device=vae.output_device, park=park, progress=progress,
                               norm_params=_norm_params, on_upcast=_on_upcast, keep_upsampled=keep)
        return (vae.process_output(out).movedim(1, -1),)


class LinFusionVAEEncodeTiled:
    CATEGORY = "latent/LinFusion"
    DESCRIPTION = ("Encodes an image tile by tile in one pass, with GroupNorm statistics over the whole image and "
                   "convolution halos: the latent matches an untiled encode apart from the mid-block attention, "
                   "which runs per tile. Several times faster than VAE Encode (Tiled), which encodes three tilings "
                   "and averages them. SD-1.x, SD-2.x and SD-XL VAEs.")
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent (the posterior mean, as VAE Encode gives).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to encode (cropped to a multiple of 8 pixels, as VAE Encode "
                                            "does)."}),
            "vae": ("VAE", {"tooltip": _VAE_TIP}),
            **_TILING,
        }}

    def encode(self, pixels, vae, tile_size=1024, overlap=64):
        if pixels.ndim != 4:
            raise ValueError(f"LinFusion VAE Encode (Tiled) takes images (batch, height, width, channels); got shape "
                             f"{tuple(pixels.shape)}")
        rgb = pixels[:, :, :, :3]
        pixels = vae.vae_encode_crop_pixels(rgb).movedim(-1, 1)  # a view: no copy of the image
        _check(vae, "encode")
        if max(pixels.shape[-2:]) <= tile_size:  # one tile: the untiled encode is the exact result
            return ({"samples": vae.encode(rgb)},)
        progress, park, _ = _prepare(vae, "encode", pixels.shape, tile_size, overlap,
                                  lambda shape, dt: vae.memory_used_encode((1, shape[1], tile_size, tile_size), dt))
        if progress is None:
            return ({"samples": vae.encode_tiled(rgb, tile_x=tile_size, tile_y=tile_size, overlap=overlap)},)
        latent = vae_tiled.encode(vae.first_stage_model, pixels, tile=tile_size, overlap=overlap, device=vae.device,
                                  dtype=vae.vae_dtype, out_device=vae.output_device, process_input=vae.process_input,
                                  park=park, progress=progress, norm_params=_norm_params, on_upcast=_on_upcast)
        return ({"samples": latent},)
