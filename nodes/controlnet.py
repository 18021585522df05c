"""ApplyLinFusionControlNet: LinFusion for the UNet encoder copy inside a ControlNet.

A ControlNet (comfy.cldm.cldm.ControlNet) repeats the UNet's input blocks and middle block, with their own softmax
self-attention, at the full latent size on every step. Its attn1 layers carry the same diffusers names as the UNet's
(``down_blocks.*`` / ``mid_block.*``), so the LinFusion weights of those UNet layers are reused there, matched by
name and checked by width. Only LinFusion's MLPs (``to_q_``/``to_k_``) are taken from the file: the ControlNet keeps
its own attn1 projections, fine-tuned with it, for every family. The patches live on a clone of the ControlNet's ModelPatcher (``control_model_wrapped``):
the incoming ControlNet is never changed, and ComfyUI loads, offloads and unpatches the clone like any model."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.cldm.cldm
import comfy.controlnet
import comfy.ldm.modules.attention
import comfy.utils

from ..linfusion_core.checkpoint import LinFusionCheckpoint, LinFusionFileError, family_from_layers
from ..linfusion_core.families import by_context_dim
from ..linfusion_core.mapping import diffusers_attn1_layers
from . import lifecycle
from .patching import patch_self_attention

log = logging.getLogger("LinFusion")

_ENCODER_HEADS = ("down_blocks.", "mid_block.")


@dataclass
class ControlNetPatchReport:
    """What ApplyLinFusionControlNet did: patched layers, layers left on softmax attention and why, or why the
    whole control model was passed through."""
    family: str = ""
    patched: list = field(default_factory=list)   # [(ComfyUI path, diffusers name, LinFusion layer index)]
    skipped: list = field(default_factory=list)   # [(ComfyUI path, reason)]
    passthrough: str = ""                         # non-empty: nothing patched, this is why

    def summary(self) -> str:
        if self.passthrough:
            return f"passed through unchanged: {self.passthrough}"
        text = f"{len(self.patched)} self-attention layer(s) of the {self.family} ControlNet use LinFusion"
        if self.skipped:
            text += "; kept softmax: " + "; ".join(f"{p} ({why})" for p, why in self.skipped)
        return text


class LinFusionControlNet(comfy.controlnet.ControlNet):
    """A ControlNet whose encoder self-attention runs LinFusion (object patches on its own ModelPatcher clone).

    Only ``copy()`` differs from ComfyUI's: copies keep the patched patcher (each copy gets a clone of it), so
    ControlNetApplyAdvanced's ``copy().set_cond_hint(...)`` and chaining through previous_controlnet keep working."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.linfusion_report = None

    def copy(self):
        c = type(self)(None, global_average_pooling=self.global_average_pooling, load_device=self.load_device,
                       manual_cast_dtype=self.manual_cast_dtype)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped.clone()
        self.copy_to(c)
        c.linfusion_report = self.linfusion_report
        return c

    def deepclone_multigpu(self, load_device, autoregister=False):
        # ComfyUI 0.33+ builds the copy for another GPU from a deep copy of the control model and a fresh patcher
        # without object patches; give that patcher ours, rebuilt over the copy's own modules.
        c = super().deepclone_multigpu(load_device, autoregister=autoregister)
        lifecycle.rebind(lifecycle.our_patches(self.control_model_wrapped), c.control_model_wrapped, reset_tree=True)
        lifecycle.attach(c.control_model_wrapped)
        return c


# -- the ControlNet's encoder ------------------------------------------------------------------------------------

def _transformer(block):
    for mod in block:
        if isinstance(mod, comfy.ldm.modules.attention.SpatialTransformer):
            return mod
    return None


def encoder_unet_config(cldm) -> dict:
    """The UNet configuration the ControlNet's encoder was built from (read off the module, so it holds for any
    loader), with the output side mirrored from the input side: enough for ``comfy.utils.unet_to_diffusers``."""
    nres, mults = list(cldm.num_res_blocks), list(cldm.channel_mult)
    depth, n = [], 1
    for level in range(len(mults)):
        for _ in range(nres[level]):
            st = _transformer(cldm.input_blocks[n])
            depth.append(len(st.transformer_blocks) if st is not None else 0)
            n += 1
        n += 1 if level != len(mults) - 1 else 0  # the downsampler
    st = _transformer(cldm.middle_block)
    depth_output, k = [], 0
    for level in range(len(mults)):
        depth_output += [max(depth[k:k + nres[level]], default=0)] * (nres[level] + 1)
        k += nres[level]
    return {"num_res_blocks": nres, "channel_mult": mults, "transformer_depth": depth,
            "transformer_depth_middle": len(st.transformer_blocks) if st is not None else 0,
            "transformer_depth_output": depth_output}


def encoder_attn1_layers(cldm) -> dict:
    """{diffusers attn1 name: ComfyUI path under the ControlNet} for every self-attention layer of the encoder."""
    layers = diffusers_attn1_layers(comfy.utils.unet_to_diffusers(encoder_unet_config(cldm)))
    return {d: c for d, c in layers.items() if d.startswith(_ENCODER_HEADS)}


def controlnet_family(cldm) -> str:
    for mod in cldm.modules():
        if isinstance(mod, comfy.ldm.modules.attention.BasicTransformerBlock):
            ctx = mod.attn2.to_k.in_features
            family = by_context_dim(ctx)  # the text width names the base family the ControlNet was built for
            return family.name if family else f"unknown (text width {ctx})"
    if getattr(cldm, "num_classes", None) is not None:  # SD-XL's pooled-text/size embedding, no transformers
        return "SD-XL"
    return "unknown"


def _families_fit(file_family: str, cn_family: str) -> bool:
    if file_family.startswith("unknown") or cn_family.startswith("unknown"):
        return True  # nothing to compare; the width checks below still apply
    return cn_family in file_family.split("/") or (cn_family == "SD-XL refiner" and file_family == "SD-XL")


def _mismatch(ckpt: LinFusionCheckpoint, cn_family: str, n_layers: int, detail: str = "") -> LinFusionFileError:
    return LinFusionFileError(
        f"LinFusion file '{ckpt.path}' ({ckpt.describe()}) does not fit this {cn_family} ControlNet "
        f"({n_layers} self-attention layers in its encoder){': ' + detail if detail else ''}. Use the "
        f"LinFusion weights made for {cn_family} (the same file as for the base model).")


# -- patching -----------------------------------------------------------------------------------------------------

def _passthrough_reason(control_net) -> str:
    if isinstance(control_net, comfy.controlnet.ControlLora):
        return ("Control-LoRA builds its encoder from the base model only when sampling starts, so there is nothing "
                "to patch here; its encoder keeps softmax attention")
    if isinstance(control_net, comfy.controlnet.T2IAdapter):
        return ("T2I-Adapter is a small convolutional network run once per hint image; it has no self-attention, so "
                "it needs no LinFusion")
    if not isinstance(control_net, comfy.controlnet.ControlNet):
        return (f"{type(control_net).__name__} is not a UNet ControlNet (it has no copy of the UNet encoder and no "
                f"self-attention for LinFusion to replace)")
    if not isinstance(control_net.control_model, comfy.cldm.cldm.ControlNet):
        return (f"its control model ({type(control_net.control_model).__name__}) is not a Stable Diffusion UNet "
                f"encoder; LinFusion has weights only for SD-1.5 / SD-2.x / SD-XL UNet self-attention")
    return ""


def apply_linfusion_controlnet(control_net, ckpt: LinFusionCheckpoint):
    """(CONTROL_NET, ControlNetPatchReport). A patched copy of a UNet ControlNet, or ``control_net`` itself (with a
    logged warning) when it has no self-attention to replace. Raises LinFusionFileError for a LinFusion file made for
    another family; ``control_net`` is never modified."""
    report = ControlNetPatchReport()
    reason = _passthrough_reason(control_net)
    cldm = None if reason else control_net.control_model
    if cldm is not None:
        report.family = controlnet_family(cldm)
        if not encoder_attn1_layers(cldm):
            reason = (f"this {report.family} ControlNet has no self-attention layers (transformer depth 0 "
                      f"everywhere, like SD-XL 'small' ControlNets), so there is nothing for LinFusion to replace")
    if reason:
        report.passthrough = reason
        log.warning("LinFusion (ControlNet): %s; returned unchanged.", reason)
        return control_net, report

    file_family = family_from_layers(ckpt.layers)
    n_enc = len(encoder_attn1_layers(cldm))
    if not _families_fit(file_family, report.family):
        raise _mismatch(ckpt, report.family, n_enc)
    # The ControlNet keeps its own attn1 projections (trained with it); only LinFusion's MLPs come from the file.
    done = patch_self_attention(control_net.control_model_wrapped, ckpt, encoder_unet_config(cldm),
                                f"this {report.family} ControlNet ({n_enc} self-attention layers in its encoder)",
                                weight_dtype=cldm.dtype, manual_cast_dtype=control_net.manual_cast_dtype,
                                only=_ENCODER_HEADS, use_file_projections=False, label_prefix="controlnet.")
    report.patched, report.skipped = done.patched, done.skipped
    c = LinFusionControlNet(None, global_average_pooling=control_net.global_average_pooling,
                            load_device=control_net.load_device, manual_cast_dtype=control_net.manual_cast_dtype)
    c.control_model = cldm
    c.control_model_wrapped = done.patcher
    control_net.copy_to(c)
    c.linfusion_report = report
    log.info("LinFusion (ControlNet): %s -> %s", ckpt.path.name, report.summary())
    if report.skipped:
        log.warning("LinFusion (ControlNet): %d encoder self-attention layer(s) keep softmax attention: %s",
                    len(report.skipped), "; ".join(f"{p} ({why})" for p, why in report.skipped))
    return c, report


class ApplyLinFusionControlNet:
    CATEGORY = "conditioning/controlnet/LinFusion"
    DESCRIPTION = ("Gives a ControlNet LinFusion's linear self-attention, with the weights of the matching UNet "
                   "layers. A ControlNet runs its own copy of the UNet encoder at full resolution on every step; "
                   "at 4K-16K that copy's softmax attention becomes the bottleneck once the UNet itself uses "
                   "LinFusion. Connect the result to Apply ControlNet as usual; the incoming ControlNet is not "
                   "changed. T2I-Adapters and other control models without self-attention pass through unchanged.")
    RETURN_TYPES = ("CONTROL_NET",)
    OUTPUT_TOOLTIPS = ("The ControlNet with LinFusion self-attention (a copy; the input ControlNet stays as it was). "
                       "Strength, start/end percent and chaining work as for any ControlNet.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "control_net": ("CONTROL_NET", {
                    "tooltip": "An SD-1.5, SD-2.x or SD-XL ControlNet from Load ControlNet Model (original or "
                               "diffusers layout, including SD-XL 'mid'/'small' ControlNets)."}),
                "linfusion": ("LINFUSION", {
                    "tooltip": "The LinFusion weights of the ControlNet's base family: the same file you give "
                               "Apply LinFusion for the model."}),
            },
        }

    def apply(self, control_net, linfusion):
        return (apply_linfusion_controlnet(control_net, linfusion)[0],)
