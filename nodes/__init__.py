"""ComfyUI nodes: thin adapters over linfusion_core. Node ids and input names are a public contract."""
from .apply import ApplyLinFusion
from .controlnet import ApplyLinFusionControlNet
from .loader import LinFusionLoader, register_folder
from .parallel import LinFusionSpatialParallel
from .vae import LinFusionVAEDecodeTiled, LinFusionVAEEncodeTiled

register_folder()

NODE_CLASS_MAPPINGS = {
    "LinFusionLoader": LinFusionLoader,
    "ApplyLinFusion": ApplyLinFusion,
    "ApplyLinFusionControlNet": ApplyLinFusionControlNet,
    "LinFusionVAEDecodeTiled": LinFusionVAEDecodeTiled,
    "LinFusionVAEEncodeTiled": LinFusionVAEEncodeTiled,
    "LinFusionSpatialParallel": LinFusionSpatialParallel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LinFusionLoader": "Load LinFusion",
    "ApplyLinFusion": "Apply LinFusion",
    "ApplyLinFusionControlNet": "Apply LinFusion (ControlNet)",
    "LinFusionVAEDecodeTiled": "VAE Decode (Tiled, LinFusion)",
    "LinFusionVAEEncodeTiled": "VAE Encode (Tiled, LinFusion)",
    "LinFusionSpatialParallel": "LinFusion Spatial Parallel (multi-device)",
}
