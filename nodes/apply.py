"""ApplyLinFusion: a clone of the model whose self-attention layers run LinFusion."""
from __future__ import annotations

from ..linfusion_core.layer import TOKENS
from .lowmem import MODES as LOW_MEMORY_MODES, TOOLTIP as LOW_MEMORY_TOOLTIP
from .patching import apply_linfusion


class ApplyLinFusion:
    CATEGORY = "model_patches/LinFusion"
    DESCRIPTION = ("Replaces every self-attention layer of an SD-1.5 / SD-2.x / SD-XL UNet with LinFusion's linear "
                   "attention. Memory and time then grow linearly with image area, so 4K-16K images fit on one GPU. "
                   "The incoming model is not changed.")
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The patched model (a copy; the input model stays as it was).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD-1.5, SD-2.x or SD-XL model to patch."}),
                "linfusion": ("LINFUSION", {"tooltip": "LinFusion weights made for this model's family."}),
            },
            "optional": {
                "softmax_below_tokens": ("INT", {
                    "default": 0, "min": 0, "max": 1 << 30, "step": 256,
                    "tooltip": "Layers that see fewer tokens than this run the model's original softmax attention "
                               "(its own quality where it is cheap). " + TOKENS + " SD-1.5 at 1024x1024: 16384, "
                               "4096, 1024, 256. 0 = always linear."}),
                "low_memory": (list(LOW_MEMORY_MODES), {"default": "auto", "tooltip": LOW_MEMORY_TOOLTIP}),
            },
        }

    def apply(self, model, linfusion, softmax_below_tokens=0, low_memory="auto"):
        return (apply_linfusion(model, linfusion, softmax_below_tokens, low_memory),)
