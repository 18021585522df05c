"""Regenerate the bundled workflows (and their preview cards) with the real ComfyUI frontend.

    LINFUSION_HOST_DIR=.host .host/venv/bin/python -m harness.build_workflows

Each graph below is assembled *inside* the frontend the host serves (nodes created by type, widgets set by name,
links connected) and saved by the frontend's own Export command (Workflow > Export): each .json is the file that
download holds, byte for byte. Nothing converts it on the way (an earlier version took ``graph.serialize()``
through Playwright, which turns every property the frontend leaves undefined into ``None``, and so wrote
``null`` for ``floatingLinks``, ``definitions``, ``extra.reroutes``, ``outputs[].slot_index``, ...: the
frontend's schema check rejected every file). This script is a maintenance tool; the tests only read the files.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "workflows"  # where the files go
sys.path.insert(0, str(REPO))

SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SD15_TILE_CN = "control_v11f1e_sd15_tile.safetensors"
COL = 420  # px between stage columns
# The canvas view saved with each file (extra.ds), which the frontend restores on opening it: scale 1, the note
# (x = -900) at the left edge of the window, so the first thing a user sees is the note, the loaders and stage 1.
VIEW = {"scale": 1, "offset": [980, 120]}
# Groups start this far above the first row of nodes (y = 80): a node's title bar sits 30 px above its position,
# and a group's title is about 35 px tall, so at 40 (as before) the first nodes covered their group's title.
GROUP_ABOVE = 80
GROUP_FONT = 18  # px; the frontend's default (24) made most stage titles wider than their group


class Spec:
    def __init__(self):
        self.nodes, self.groups = [], []

    def add(self, key, type_, pos, widgets=None, inputs=None, title=None, size=None, **kw):
        self.nodes.append(dict(key=key, type=type_, pos=list(pos), widgets=widgets or {}, inputs=inputs or {},
                               title=title, size=size, **kw))
        return key

    def group(self, title, x, y, w, h, color="#3f789e"):
        """A group whose first row of nodes is at ``y + 40`` (its top goes up to make room for its title)."""
        top = y + 40 - GROUP_ABOVE
        self.groups.append(dict(title=title, pos=[x, top], size=[w, h + y - top], color=color, font_size=GROUP_FONT))

    def as_dict(self):
        return {"nodes": self.nodes, "groups": self.groups, "view": VIEW}


def _ksampler(steps, denoise, cfg, seed, sampler, scheduler):
    return {"seed": seed, "control_after_generate": "fixed", "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": scheduler, "denoise": denoise}


ROWS = dict(scale=80, enc=260, ks=420, dec=720, out=860)                # y of each node row in a stage column
ROWS_CN = dict(scale=80, enc=260, cn=420, ks=620, dec=960, out=1100)    # the same with a ControlNet row


def chain(s: Spec, *, model, pos, neg, vae, first_image, stages, tiled_from, prefix, cfg, seed, sampler, scheduler,
          x0, tile_encode, tile_decode, control_net=None, cn_strength=0.6, rows=ROWS, group_h=1000):
    """SDEdit stages: ImageScale (bicubic, exact size) -> VAE encode -> KSampler(steps, denoise) -> VAE decode.
    stages: [(width, height, steps, denoise)]. With ``control_net`` (a key, slot), every stage conditions the
    sampler through ControlNetApplyAdvanced with the upscaled image as its hint (tile ControlNet).
    Returns the key of the last decoded image."""
    img = first_image
    for i, (w, h, steps, denoise) in enumerate(stages):
        x = x0 + i * COL
        tiled = w * h >= tiled_from
        k = f"s{i}"
        # (short enough to fit over the group at GROUP_FONT: a longer title runs into the next group's; the steps
        # are in the KSampler, the tiling and the ControlNet are nodes of the group)
        s.group(f"Stage {i + 2}: {w}x{h}, denoise {denoise}", x - 10, 40, COL - 20, group_h)
        s.add(k + "scale", "ImageScale", (x, rows["scale"]), {"upscale_method": "bicubic", "width": w, "height": h,
                                                              "crop": "disabled"}, {"image": (img, 0)})
        if tiled:
            s.add(k + "enc", "LinFusionVAEEncodeTiled", (x, rows["enc"]), {"tile_size": tile_encode[0],
                                                                            "overlap": tile_encode[1]},
                  {"pixels": (k + "scale", 0), "vae": vae})
        else:
            s.add(k + "enc", "VAEEncode", (x, rows["enc"]), {}, {"pixels": (k + "scale", 0), "vae": vae})
        cond = {"positive": pos, "negative": neg}
        if control_net:
            s.add(k + "cn", "ControlNetApplyAdvanced", (x, rows["cn"]),
                  {"strength": cn_strength, "start_percent": 0, "end_percent": 1},
                  {"positive": pos, "negative": neg, "control_net": control_net, "image": (k + "scale", 0)},
                  title="Apply ControlNet (tile)")
            cond = {"positive": (k + "cn", 0), "negative": (k + "cn", 1)}
        s.add(k + "ks", "KSampler", (x, rows["ks"]), _ksampler(steps, denoise, cfg, seed, sampler, scheduler),
              {"model": model, **cond, "latent_image": (k + "enc", 0)})
        if tiled:
            s.add(k + "dec", "LinFusionVAEDecodeTiled", (x, rows["dec"]), {"tile_size": tile_decode[0],
                                                                            "overlap": tile_decode[1]},
                  {"samples": (k + "ks", 0), "vae": vae})
        else:
            s.add(k + "dec", "VAEDecode", (x, rows["dec"]), {}, {"samples": (k + "ks", 0), "vae": vae})
        last = i == len(stages) - 1
        if last:
            s.add(k + "out", "SaveImage", (x, rows["out"]), {"filename_prefix": prefix}, {"images": (k + "dec", 0)},
                  size=[320, 120])
        else:
            s.add(k + "out", "PreviewImage", (x, rows["out"]), {}, {"images": (k + "dec", 0)}, size=[320, 120])
        img = k + "dec"
    return img


SD15_NOTE = """# LinFusion SD-1.5: text to 16384x8192 (the authors' SDEdit chain)

1024x512 text-to-image, then four 2x stages: each resizes the previous image (ImageScale, bicubic, exact size), encodes it, and re-denoises with **denoise 0.4 / 0.3 / 0.2 / 0.1** at 2048x1024 / 4096x2048 / 8192x4096 / 16384x8192.

**Steps.** KSampler with denoise d < 1 runs `steps` steps of a `int(steps/d)`-step schedule, so steps 20/15/10/5 with denoise 0.4/0.3/0.2/0.1 are exactly "20/15/10/5 of 50", the authors' recipe. Keep steps/denoise = 50 when you change one.

**LinFusion.** Every KSampler uses the model patched by *Apply LinFusion* (weights `Yuanshi/LinFusion-1-5`, downloaded into models/linfusion/ on first use). `softmax_below_tokens` = 0: LinFusion everywhere, as the authors ran it, because SD-1.5's own attention at 1024x512 (twice its training size) tends to duplicate objects, and LinFusion carries over resolution better. Set it to 16384 to keep stock softmax attention where it is cheap (the base stage and the deeper levels of stage 2).

**VAE.** Tiled from the 4K stage on with *VAE Decode/Encode (Tiled, LinFusion)* (this pack): one pass, GroupNorm statistics over the whole image and convolution halos, so apart from the VAE's mid-block attention (per tile) the result is the untiled one; ComfyUI's VAE Decode/Encode (Tiled) runs three tilings and averages them (three times the work, each tile with its own statistics), which made the VAE the slowest part of the chain once attention is linear. Tile 2048 px (the reference notebook's), overlap 128 px of attention context; lower tile_size if the VAE runs out of GPU memory. The whole-image activations it keeps live in RAM (about 80 GB at 16K in fp16/bf16).

**Memory.** 16K with SD-1.5 wants a GPU with ~40-80 GB; the peak is the 16K KSampler. Intermediates are shown by Preview Image; only the final image is saved.

Checkpoint: any SD-1.5 model (the authors used dreamshaper-8). Sampler deis + ddim_uniform mirror their DEIS multistep scheduler with leading spacing; seed fixed for every stage."""

SDXL_NOTE = """# LinFusion SD-XL: text to 16384x8192

Base 1024x512, then 2x, 4x, 8x, 16x stages (2048x1024 ... 16384x8192) with **denoise 0.32 / 0.24 / 0.16 / 0.08** (steps 16/12/8/4 = those fractions of a 50-step schedule, the authors' SD-XL strengths).

**Base stage: stock attention.** The base KSampler uses *Apply LinFusion (base)* with `softmax_below_tokens` = 16384: at 1024x512 every layer sees at most 8192 tokens, so the whole base stage runs SD-XL's own softmax attention, which is cheap there and gives SD-XL's own image (the authors' low-memory chain also starts from plain SD-XL). The upscale stages use *Apply LinFusion* with 0 (linear attention everywhere), where softmax would be quadratic.

**Conditioning.** CLIPTextEncodeSDXL with size and target size = the final 16384x8192 for every stage, as in the authors' pipeline; the negative is zeroed (ConditioningZeroOut), like their `negative_prompt=None`. CFG 5 for the base, 7.5 for the upscale stages.

**Not included:** the DemoFusion-style dilated global path and skip residual of the authors' SD-XL pipeline (no node for them yet); this is plain SDEdit with LinFusion, sampler euler + ddim_uniform (their Euler with leading spacing).

**VAE.** Tiled from the 4K stage on with *VAE Decode/Encode (Tiled, LinFusion)* (this pack): one pass, GroupNorm statistics over the whole image and convolution halos, so apart from the VAE's mid-block attention (per tile) the result is the untiled one; ComfyUI's VAE Decode/Encode (Tiled) runs three tilings and averages them (three times the work, each tile with its own statistics), which made the VAE the slowest part of the chain once attention is linear. Tile 2048 px, overlap 128 px of attention context; lower tile_size if the VAE runs out of GPU memory. The SD-XL VAE overflows in fp16; ComfyUI runs it in bf16 or fp32, and if fp16 is forced the node reruns in bf16/fp32 when it sees an overflow. The whole-image activations it keeps live in RAM (about 80 GB at 16K in fp16/bf16)."""

UPSCALE_NOTE = """# LinFusion: upscale your own image in 2x stages

Load Image -> fit to 1024x1024 (ImageScale, crop center) -> 2048x2048 (denoise 0.3) -> 4096x4096 (denoise 0.2), each stage re-denoised by an SD-1.5 KSampler on the LinFusion-patched model.

**Chosen size.** Set the ImageScale width/height of each stage; keep each stage 2x the previous one (SDEdit works best in 2x steps). For 8K add a stage: copy the last group, set 8192x8192 and denoise 0.1 / steps 5. For non-square images set all sizes to your aspect ratio (crop center at the first node only).

**Strength.** denoise 0.3/0.2 adds detail while keeping your picture; raise it for more new detail, lower it for fidelity. Steps = denoise x 50 keeps a 50-step schedule (KSampler runs `steps` of `int(steps/denoise)`).

**Prompt.** Describe the image; the prompt steers the new detail. LinFusion: `Yuanshi/LinFusion-1-5`, `softmax_below_tokens` 0 (every stage is above SD-1.5's training size). VAE tiled at every stage (1024 px tiles) since the input size is yours, with *VAE Decode/Encode (Tiled, LinFusion)* (this pack): one pass, GroupNorm statistics over the whole image and convolution halos, so apart from the VAE's mid-block attention (per tile) the result is the untiled one; ComfyUI's VAE Decode/Encode (Tiled) runs three tilings and averages them (three times the work, each tile with its own statistics), which made the VAE the slowest part of the chain once attention is linear."""


TILE_NOTE = """# LinFusion SD-1.5 + Tile ControlNet: text to 16384x8192

The authors' SDEdit chain (1024x512 text-to-image, then 2x stages at 2048x1024 / 4096x2048 / 8192x4096 / 16384x8192 with **denoise 0.4 / 0.3 / 0.2 / 0.1**), with a **Tile ControlNet** at every upscale stage: it sees the upscaled image as its hint and keeps each stage's new detail faithful to the previous stage's picture.

**ControlNet file.** `control_v11f1e_sd15_tile.safetensors` from `lllyasviel/ControlNet-v1-1` into `models/controlnet/` (the `.pth` works too; the diffusers `control_v11f1e_sd15_tile` folder's safetensors as well).

**Apply LinFusion (ControlNet).** A ControlNet runs its own copy of the UNet encoder at the full latent size on every step; with only the UNet patched, that copy's softmax attention is the quadratic bottleneck at 8K-16K. This node gives the ControlNet's self-attention layers the LinFusion weights of the same UNet layers (the same `Yuanshi/LinFusion-1-5` file). The ControlNet from the loader is not changed, so a stock branch can share it.

**Knobs.**
- `strength` (0.6 here): how closely each stage follows the upscaled image. 0.4-1.0; lower gives the sampler more freedom, higher keeps the composition and colours locked.
- `start_percent` / `end_percent` (0 / 1): when the ControlNet acts within each stage's steps; end 0.8 lets the last steps refine freely.
- `steps` / `denoise`: KSampler runs `steps` of an `int(steps/denoise)`-step schedule, so 20/15/10/5 with 0.4/0.3/0.2/0.1 are "20/15/10/5 of 50", the authors' recipe. Keep steps/denoise = 50.
- VAE: tiled from the 4K stage on (2048 px tiles, 128 px attention overlap) with *VAE Decode/Encode (Tiled, LinFusion)* (this pack): one pass, GroupNorm statistics over the whole image and convolution halos, so apart from the VAE's mid-block attention (per tile) the result is the untiled one; ComfyUI's VAE Decode/Encode (Tiled) runs three tilings and averages them (three times the work, each tile with its own statistics), which made the VAE the slowest part of the chain once attention is linear. Lower tile_size if the VAE runs out of GPU memory.

**Memory.** The ControlNet's hint encoder runs convolutions at the full pixel size (linear in area, a few GB at 16K); the peak is the 16K stage (UNet + ControlNet). Plan for a GPU with ~40-80 GB at 16K. Intermediates are shown by Preview Image; only the final image is saved."""


def _sd15_front(s: Spec, note: str, note_h: int, pos_text: str, neg_text: str, pos_title: str = "Prompt") -> None:
    """The SD-1.5 workflows' left column: the note, the checkpoint, Load + Apply LinFusion and the two prompts."""
    s.add("note", "MarkdownNote", (-900, 80), {"text": note}, size=[440, note_h])
    s.add("ckpt", "CheckpointLoaderSimple", (-420, 80), {"ckpt_name": SD15_CKPT})
    s.add("lfload", "LinFusionLoader", (-420, 260), {"linfusion_name": "Yuanshi/LinFusion-1-5"})
    s.add("lf", "ApplyLinFusion", (-420, 380), {"softmax_below_tokens": 0},
          {"model": ("ckpt", 0), "linfusion": ("lfload", 0)})
    s.add("pos", "CLIPTextEncode", (-420, 540), {"text": pos_text}, {"clip": ("ckpt", 1)}, title=pos_title)
    s.add("neg", "CLIPTextEncode", (-420, 780), {"text": neg_text}, {"clip": ("ckpt", 1)}, title="Negative prompt")


def _sd15_text_to_image(s: Spec, group_h: int, ks_y: int, dec_y: int) -> None:
    """Stage 1 of the SD-1.5 16K chains: 1024x512 text to image, 50 steps, decoded and previewed."""
    s.group("Stage 1: 1024x512 text to image", -10, 40, COL - 20, group_h, color="#8A8")
    s.add("empty", "EmptyLatentImage", (0, 80), {"width": 1024, "height": 512, "batch_size": 1})
    s.add("ks0", "KSampler", (0, ks_y), _ksampler(50, 1.0, 7.5, 3, "deis", "ddim_uniform"),
          {"model": ("lf", 0), "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("empty", 0)})
    s.add("dec0", "VAEDecode", (0, dec_y), {}, {"samples": ("ks0", 0), "vae": ("ckpt", 2)})
    s.add("prev0", "PreviewImage", (0, dec_y + 140), {}, {"images": ("dec0", 0)}, size=[320, 120])


def sd15_16k() -> Spec:
    s = Spec()
    _sd15_front(s, SD15_NOTE, 760, "A photo of the Milky Way galaxy", "")
    _sd15_text_to_image(s, group_h=1000, ks_y=420, dec_y=720)
    chain(s, model=("lf", 0), pos=("pos", 0), neg=("neg", 0), vae=("ckpt", 2), first_image="dec0",
          stages=[(2048, 1024, 20, 0.4), (4096, 2048, 15, 0.3), (8192, 4096, 10, 0.2), (16384, 8192, 5, 0.1)],
          tiled_from=4096 * 2048, prefix="LinFusion_sd15_16k", cfg=7.5, seed=3, sampler="deis",
          scheduler="ddim_uniform", x0=COL, tile_encode=(2048, 128), tile_decode=(2048, 128))
    return s


def sdxl_16k() -> Spec:
    s = Spec()
    W, H = 16384, 8192
    s.add("note", "MarkdownNote", (-900, 80), {"text": SDXL_NOTE}, size=[440, 760])
    s.add("ckpt", "CheckpointLoaderSimple", (-420, 80), {"ckpt_name": SDXL_CKPT})
    s.add("lfload", "LinFusionLoader", (-420, 220), {"linfusion_name": "Yuanshi/LinFusion-XL"})
    s.add("lfbase", "ApplyLinFusion", (-420, 330), {"softmax_below_tokens": 16384},
          {"model": ("ckpt", 0), "linfusion": ("lfload", 0)}, title="Apply LinFusion (base: stock attention)")
    s.add("lf", "ApplyLinFusion", (-420, 470), {"softmax_below_tokens": 0},
          {"model": ("ckpt", 0), "linfusion": ("lfload", 0)}, title="Apply LinFusion (upscale stages)")
    cond = {"width": W, "height": H, "crop_w": 0, "crop_h": 0, "target_width": W, "target_height": H}
    s.add("pos", "CLIPTextEncodeSDXL", (-420, 610),
          dict(cond, text_g="A photo of the Milky Way galaxy", text_l="A photo of the Milky Way galaxy"),
          {"clip": ("ckpt", 1)}, title="Prompt (SD-XL, final size)")
    s.add("negtxt", "CLIPTextEncodeSDXL", (-420, 1000), dict(cond, text_g="", text_l=""), {"clip": ("ckpt", 1)},
          title="Negative (zeroed below)")
    s.add("neg", "ConditioningZeroOut", (-420, 1380), {}, {"conditioning": ("negtxt", 0)})
    s.group("Stage 1: 1024x512, stock attention", -10, 40, COL - 20, 1000, color="#8A8")
    s.add("empty", "EmptyLatentImage", (0, 80), {"width": 1024, "height": 512, "batch_size": 1})
    s.add("ks0", "KSampler", (0, 420), _ksampler(50, 1.0, 5.0, 42, "euler", "ddim_uniform"),
          {"model": ("lfbase", 0), "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("empty", 0)})
    s.add("dec0", "VAEDecode", (0, 720), {}, {"samples": ("ks0", 0), "vae": ("ckpt", 2)})
    s.add("prev0", "PreviewImage", (0, 860), {}, {"images": ("dec0", 0)}, size=[320, 120])
    chain(s, model=("lf", 0), pos=("pos", 0), neg=("neg", 0), vae=("ckpt", 2), first_image="dec0",
          stages=[(2048, 1024, 16, 0.32), (4096, 2048, 12, 0.24), (8192, 4096, 8, 0.16), (16384, 8192, 4, 0.08)],
          tiled_from=4096 * 2048, prefix="LinFusion_sdxl_16k", cfg=7.5, seed=42, sampler="euler",
          scheduler="ddim_uniform", x0=COL, tile_encode=(2048, 128), tile_decode=(2048, 128))
    return s


def sd15_tile_controlnet_16k() -> Spec:
    s = Spec()
    _sd15_front(s, TILE_NOTE, 980, "A photo of the Milky Way galaxy", "")
    s.add("cnload", "ControlNetLoader", (-420, 1020), {"control_net_name": SD15_TILE_CN},
          title="Load ControlNet (tile)")
    s.add("cnlf", "ApplyLinFusionControlNet", (-420, 1140), {},
          {"control_net": ("cnload", 0), "linfusion": ("lfload", 0)})
    _sd15_text_to_image(s, group_h=1240, ks_y=620, dec_y=960)
    chain(s, model=("lf", 0), pos=("pos", 0), neg=("neg", 0), vae=("ckpt", 2), first_image="dec0",
          stages=[(2048, 1024, 20, 0.4), (4096, 2048, 15, 0.3), (8192, 4096, 10, 0.2), (16384, 8192, 5, 0.1)],
          tiled_from=4096 * 2048, prefix="LinFusion_sd15_tile_16k", cfg=7.5, seed=3, sampler="deis",
          scheduler="ddim_uniform", x0=COL, tile_encode=(2048, 128), tile_decode=(2048, 128),
          control_net=("cnlf", 0), cn_strength=0.6, rows=ROWS_CN, group_h=1240)
    return s


def upscale_image() -> Spec:
    s = Spec()
    _sd15_front(s, UPSCALE_NOTE, 700, "a highly detailed photo, sharp focus", "blurry, lowres",
                pos_title="Prompt (describe your image)")
    s.group("Your image, fitted to 1024x1024", -10, 40, COL - 20, 1000, color="#8A8")
    s.add("load", "LoadImage", (0, 80), {"image": "example.png"}, size=[320, 360])
    s.add("fit", "ImageScale", (0, 480), {"upscale_method": "bicubic", "width": 1024, "height": 1024,
                                          "crop": "center"}, {"image": ("load", 0)})
    chain(s, model=("lf", 0), pos=("pos", 0), neg=("neg", 0), vae=("ckpt", 2), first_image="fit",
          stages=[(2048, 2048, 15, 0.3), (4096, 4096, 10, 0.2)], tiled_from=0, prefix="LinFusion_upscale",
          cfg=7.0, seed=0, sampler="dpmpp_2m", scheduler="karras", x0=COL, tile_encode=(1024, 64),
          tile_decode=(1024, 64))
    return s


WORKFLOWS = {
    "linfusion_sd15_16k": (sd15_16k, "SD-1.5 + LinFusion: text to 16384x8192",
                           ["1024x512 txt2img, 50 steps", "2048x1024  denoise 0.4",
                            "4096x2048  denoise 0.3 (tiled VAE)", "8192x4096  denoise 0.2 (tiled VAE)",
                            "16384x8192 denoise 0.1 (tiled VAE)"]),
    "linfusion_sdxl_16k": (sdxl_16k, "SD-XL + LinFusion: text to 16384x8192",
                           ["1024x512 base, 50 steps, stock attention", "2048x1024  denoise 0.32",
                            "4096x2048  denoise 0.24 (tiled VAE)", "8192x4096  denoise 0.16 (tiled VAE)",
                            "16384x8192 denoise 0.08 (tiled VAE)"]),
    "linfusion_sd15_tile_controlnet_16k": (sd15_tile_controlnet_16k,
                                           "SD-1.5 + LinFusion + Tile ControlNet: 16384x8192",
                                           ["1024x512 txt2img, 50 steps", "2048x1024  denoise 0.4 + tile CN",
                                            "4096x2048  denoise 0.3 + tile CN", "8192x4096  denoise 0.2 + tile CN",
                                            "16384x8192 denoise 0.1 + tile CN"]),
    "linfusion_upscale_image": (upscale_image, "LinFusion: upscale your image in 2x stages",
                                ["your image -> 1024x1024", "2048x2048  denoise 0.3", "4096x4096  denoise 0.2",
                                 "(add stages for 8K / 16K)"]),
}


def preview(path: Path, title: str, lines: list) -> None:
    """A title card: the stage chain as boxes growing 2x (no real weights exist here to render a sample)."""
    from PIL import Image, ImageDraw, ImageFont
    W, H = 1024, 512
    im = Image.new("RGB", (W, H), (18, 22, 34))
    d = ImageDraw.Draw(im)
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", 34)
        small = ImageFont.truetype("DejaVuSans.ttf", 20)
    except OSError:
        font = small = ImageFont.load_default()
    d.text((32, 24), title, fill=(240, 240, 250), font=font)
    x, base_y = 40, 470
    for i, line in enumerate(lines):
        w = 40 * (1.45 ** i)
        h = w / 2
        col = (60 + 35 * i, 110 + 20 * i, 200 - 25 * i)
        d.rectangle([x, base_y - h, x + w, base_y], outline=col, width=3)
        x += w + 18
        d.text((560, 110 + 46 * i), f"{i + 1}. {line}", fill=col, font=small)
    d.text((32, 76), "ComfyUI-LinFusion workflow (linear attention: memory grows with area)", fill=(150, 160, 180),
           font=small)
    im.save(path, quality=88)


def main() -> int:
    from harness.frontend import Frontend
    from harness.host import default_server
    names = sys.argv[1:] or list(WORKFLOWS)
    with default_server() as srv, Frontend(srv.url) as fe:
        fe.close_dialogs()
        print(f"frontend {fe.version}")
        for name in names:
            make, title, lines = WORKFLOWS[name]
            text = fe.build(make().as_dict(), name)  # the file the frontend's Export writes, unchanged
            (HERE / f"{name}.json").write_text(text)
            preview(HERE / f"{name}.jpg", title, lines)
            print(f"wrote workflows/{name}.json ({len(json.loads(text)['nodes'])} nodes) and {name}.jpg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
