"""LinFusion in plain PyTorch: the linear attention, reading the released weights, the UNet layer map.
Nothing here imports ComfyUI."""
