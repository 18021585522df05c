"""The model families this pack knows: one table, holding what every part of the pack needs to know of each.

A row is looked up by ComfyUI's model-config class name (a loaded model), by cross-attention width (a ControlNet,
whose text width names its base family) or by key. Families without LinFusion weights are listed too, so that an
error can name the model the user gave.

Fields:
  name                      display name, as messages and the README write it
  context_dim               width of the text conditioning the UNet's cross-attention reads
  config_classes            ComfyUI ``supported_models`` class names of this family
  attention_levels          latent-area divisor of every level that has self-attention: a layer there sees
                            latent px / divisor tokens per image
  first_transformer_level   (channels, latent-area divisor) of the first level with transformer blocks: where the
                            feed-forward is chunked first (linfusion_core/chunked.py)
  memory                    measured memory of one patched UNet step (nodes/memory.py: fp32 bytes per latent pixel
                            per batch row and a fixed part; "chunked": the line once the first level's feed-forward
                            runs in token chunks), or None: ComfyUI's own estimate is kept
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    key: str
    name: str
    context_dim: int
    config_classes: tuple = ()
    attention_levels: tuple = ()
    first_transformer_level: tuple | None = None
    memory: dict | None = None


# benchmarks/bench_step_memory.py prints these fits; the measurements are in benchmarks/results/step_memory_*_cpu.*.
_SD15_MEMORY = {"per_pixel": 38_000.0, "fixed": 120e6, "measured": "SD-1.5 UNet, CPU fp32, 512x256..1536x768",
                "chunked": {"per_pixel": 16_100.0, "fixed": 360e6,
                            "measured": "SD-1.5 UNet, CPU fp32, 2048x1024..4096x2048"}}
# "lowmem": the line with the low-memory mode (nodes/lowmem.py), the peak bytes allocated in one step with the
# parked skips outside and every 16K-sized piece chunked (benchmarks/bench_lowmem.py --name allocated_cpu,
# benchmarks/results/lowmem_fits_allocated_cpu.json; docs/benchmarks.md, 2026-12-07 19:22-19:32 UTC, with the
# decoder's concatenation read by bands from its parts and the skip convolutions by bands: SD-1.5 5,911 B/px,
# SD-XL 6,549 B/px, rounded up). The fixed part adds the chunk temporaries of the default chunk sizes (144 MB
# above the line at 4096x2048, fp32).
_SD15_MEMORY["lowmem"] = {"per_pixel": 6_000.0, "fixed": 160e6,
                          "measured": "SD-1.5 UNet, CPU fp32, 2048x1024..3072x1536, allocator peak, all chunked"}
# SD-XL was measured before feed-forward chunking (1024x512..2048x2048): above the chunking threshold (2048x2048 at
# batch 1) this line over-estimates; no "chunked" line measured yet.
_SDXL_MEMORY = {"per_pixel": 21_300.0, "fixed": 152e6, "measured": "SD-XL UNet, CPU fp32, 1024x512..2048x2048",
                "lowmem": {"per_pixel": 6_600.0, "fixed": 160e6,
                           "measured": "SD-XL UNet, CPU fp32, 2048x1024..3072x1536, allocator peak, all chunked"}}

_SD_LEVELS = dict(attention_levels=(1, 4, 16, 64), first_transformer_level=(320, 1))

FAMILIES = (
    Family("sd15", "SD-1.5", 768, ("SD15",), **_SD_LEVELS, memory=_SD15_MEMORY),
    # The same UNet widths and depths as SD-1.5 (only head sizes and linear proj_in/out differ): its memory line.
    Family("sd21", "SD-2.x", 1024, ("SD20",), **_SD_LEVELS, memory=_SD15_MEMORY),
    Family("sd21-unclip", "SD-2.1 unCLIP", 1024, ("SD21UnclipL", "SD21UnclipH"), **_SD_LEVELS, memory=_SD15_MEMORY),
    Family("sdxl", "SD-XL", 2048, ("SDXL",), attention_levels=(4, 16), first_transformer_level=(640, 4),
           memory=_SDXL_MEMORY),
    Family("sdxl-refiner", "SD-XL refiner", 1280, ("SDXLRefiner",)),
    Family("ssd1b", "SSD-1B", 2048, ("SSD1B",)),
    Family("vega", "Segmind Vega", 2048, ("Segmind_Vega",)),
    Family("koala-700m", "KOALA-700M", 2048, ("KOALA_700M",)),
    Family("koala-1b", "KOALA-1B", 2048, ("KOALA_1B",)),
    Family("sd-x4-upscaler", "SD x4 upscaler", 1024, ("SD_X4Upscaler",)),
)
BY_KEY = {f.key: f for f in FAMILIES}


def by_config_class(class_name: str) -> Family | None:
    """The family of a ComfyUI model config class (``type(model.model_config).__name__``), or None."""
    return next((f for f in FAMILIES if class_name in f.config_classes), None)


def by_context_dim(width: int) -> Family | None:
    """The base family whose text conditioning is ``width`` wide (the first row listed for it), or None."""
    return next((f for f in FAMILIES if f.context_dim == width), None)
