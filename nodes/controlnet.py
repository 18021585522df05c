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
import comfy.model_management
import comfy.ops
import comfy.utils
import torch

from ..linfusion_core.checkpoint import LinFusionCheckpoint, LinFusionFileError, family_from_layers
from ..linfusion_core.chunked import TokenChunkedFeedForward
from ..linfusion_core.layer import LinFusionAttention, build_layer
from ..linfusion_core.mapping import diffusers_attn1_layers, diffusers_module_order, layer_map
from . import lifecycle
from .patching import chunk_feed_forwards

log = logging.getLogger("LinFusion")

# Cross-attention width of the text conditioning -> base family (the ControlNet is built for that family's UNet).
_CONTEXT_FAMILIES = {768: "SD-1.5", 1024: "SD-2.x", 1280: "SD-XL refiner", 2048: "SD-XL"}
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
    return {d: c for d, c in sorted(layers.items(), key=lambda kv: diffusers_module_order(kv[0]))
            if d.startswith(_ENCODER_HEADS)}


def controlnet_family(cldm) -> str:
    for mod in cldm.modules():
        if isinstance(mod, comfy.ldm.modules.attention.BasicTransformerBlock):
            ctx = mod.attn2.to_k.in_features
            return _CONTEXT_FAMILIES.get(ctx, f"unknown (text width {ctx})")
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


def map_encoder(ckpt: LinFusionCheckpoint, cldm, cn_family: str):
    """([(LayerWeights, ComfyUI path, diffusers name)], [(ComfyUI path, reason)]) for the encoder's attn1 layers.

    With config.json names, layers match by name (so ControlNets with fewer transformer blocks than the base UNet,
    like SD-XL "mid" ControlNets, take the weights of the same-named UNet layers). Without names, the file's layer
    order is that of the full UNet the encoder mirrors."""
    enc = encoder_attn1_layers(cldm)
    if all(lw.module_name for lw in ckpt.layers):
        by_name = {lw.module_name: lw for lw in ckpt.layers}
    else:
        full = comfy.utils.unet_to_diffusers(encoder_unet_config(cldm))
        comfy_to_name = {c: d for d, c in diffusers_attn1_layers(full).items()}
        try:
            mapped = layer_map(ckpt, full, f"a UNet built like this {cn_family} ControlNet's encoder")
        except LinFusionFileError as e:
            raise _mismatch(ckpt, cn_family, len(enc),
                            "the file has no config.json naming its layers, so they are taken in the order of a full "
                            f"UNet mirroring this encoder, and that does not line up ({e}). If the ControlNet has "
                            "fewer transformer blocks than its base model, put the released config.json beside "
                            "the LinFusion file") from None
        by_name = {comfy_to_name[path]: lw for lw, path in mapped}

    found, skipped = [], []
    for name, path in enc.items():
        lw = by_name.get(name)
        if lw is None:
            skipped.append((path, f"the LinFusion file has no weights for {name}"))
        else:
            found.append((lw, path, name))
    return found, skipped


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


def _operations_and_dtype(control_net):
    # The ops and dtype ComfyUI picked for this ControlNet, so the new layers cast and offload like its own.
    dtype = control_net.control_model.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = control_net.manual_cast_dtype or torch.float16
    ops = comfy.ops.manual_cast if control_net.manual_cast_dtype is not None else comfy.ops.disable_weight_init
    return ops, dtype


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
    found, report.skipped = map_encoder(ckpt, cldm, report.family)

    src = control_net.control_model_wrapped
    bases = {}
    for lw, path, name in found:
        base = src.get_model_object(path)
        if isinstance(base, LinFusionAttention):  # applying again replaces the earlier LinFusion
            base = base._base
        width, heads = base.to_q.in_features, base.heads
        if lw.dim != width or (lw.heads is not None and lw.heads != heads):
            raise _mismatch(ckpt, report.family, n_enc,
                            f"LinFusion layer {lw.index} ({name}) is {lw.dim} wide"
                            + (f" with {lw.heads} heads" if lw.heads else "")
                            + f", but the ControlNet's {path} is {width} wide with {heads} heads")
        bases[path] = base

    block_paths = {p[: -len(".attn1")] for _, p, _ in found}
    for bpath in sorted(block_paths):
        if getattr(src.get_model_object(bpath), "disable_self_attn", False):
            report.skipped.append((f"{bpath}.attn1", "attn1 is cross-attention in this block (disable_self_attn)"))
    found = [f for f in found if not getattr(src.get_model_object(f[1][: -len(".attn1")]), "disable_self_attn", False)]

    ops, dtype = _operations_and_dtype(control_net)
    c = LinFusionControlNet(None, global_average_pooling=control_net.global_average_pooling,
                            load_device=control_net.load_device, manual_cast_dtype=control_net.manual_cast_dtype)
    c.control_model = cldm
    c.control_model_wrapped = src.clone()
    for path, obj in list(c.control_model_wrapped.object_patches.items()):
        if isinstance(obj, (LinFusionAttention, TokenChunkedFeedForward)):  # an earlier LinFusion is replaced
            del c.control_model_wrapped.object_patches[path]
    control_net.copy_to(c)
    extra_bytes = 0
    for lw, path, name in found:
        comfy.model_management.throw_exception_if_processing_interrupted()
        # The ControlNet keeps its own attn1 projections (trained with it); only LinFusion's MLPs come from the file.
        layer = build_layer(bases[path], lw, ops=ops, dtype=dtype, label=f"controlnet.{path}",
                            use_file_projections=False)
        extra_bytes += sum(p.numel() * p.element_size() for p in layer.linfusion.parameters())
        c.control_model_wrapped.add_object_patch(path, layer)
        report.patched.append((path, name, lw.index))
    m = c.control_model_wrapped
    chunk_feed_forwards(m, [path for _, path, _ in found])
    lifecycle.attach(m)
    if isinstance(getattr(m, "size", None), int) and m.size > 0:
        m.size += extra_bytes
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
