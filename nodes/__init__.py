"""ComfyUI nodes: thin adapters over linfusion_core. Node ids and input names are a public contract."""
from .apply import ApplyLinFusion
from .controlnet import ApplyLinFusionControlNet
from .loader import LinFusionLoader, register_folder

register_folder()

NODE_CLASS_MAPPINGS = {
    "LinFusionLoader": LinFusionLoader,
    "ApplyLinFusion": ApplyLinFusion,
    "ApplyLinFusionControlNet": ApplyLinFusionControlNet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LinFusionLoader": "Load LinFusion",
    "ApplyLinFusion": "Apply LinFusion",
    "ApplyLinFusionControlNet": "Apply LinFusion (ControlNet)",
}
