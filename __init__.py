"""ComfyUI-LinFusion. Inside ComfyUI this registers the nodes; imported anywhere else it registers nothing,
so ``linfusion_core`` stays importable (and testable) without ComfyUI."""
import importlib.util

if importlib.util.find_spec("folder_paths") is not None and importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
