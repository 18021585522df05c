"""LinFusionLoader: pick a LinFusion weight file from models/linfusion (or a released repository)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import folder_paths

from ..linfusion_core.checkpoint import LinFusionFileError, load_checkpoint

log = logging.getLogger("LinFusion")
FOLDER = "linfusion"
RELEASED = {"Yuanshi/LinFusion-1-5": "LinFusion-1-5", "Yuanshi/LinFusion-2-1": "LinFusion-2-1",
            "Yuanshi/LinFusion-XL": "LinFusion-XL"}
RELEASED_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def register_folder() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0]
    if default not in paths:
        paths.insert(0, default)
    # extra_model_paths.yaml may have created the entry already (with no extension filter); keep its paths.
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})


def _released_dir(repo: str) -> Path:
    return Path(folder_paths.get_folder_paths(FOLDER)[0]) / RELEASED[repo]


def fetch_released(repo: str) -> Path:
    """The released repository's safetensors, downloaded on first use. Atomic: files appear only when complete."""
    for base in folder_paths.get_folder_paths(FOLDER):
        cand = Path(base) / RELEASED[repo]
        if all((cand / f).is_file() for f in RELEASED_FILES):
            return cand / RELEASED_FILES[1]
    dest = _released_dir(repo)
    where = f"put {' and '.join(RELEASED_FILES)} from https://huggingface.co/{repo} into {dest}{os.sep}"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise LinFusionFileError(f"cannot download {repo}: huggingface_hub is not installed; {where}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for name in RELEASED_FILES:
            hf_hub_download(repo_id=repo, filename=name, local_dir=str(staging))
        dest.mkdir(exist_ok=True)
        for name in RELEASED_FILES:
            os.replace(staging / name, dest / name)
    except LinFusionFileError:
        raise
    except Exception as e:
        raise LinFusionFileError(f"could not download {repo} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                 f"{where}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest / RELEASED_FILES[1]


def resolve(name: str) -> Path:
    if name in RELEASED:
        return fetch_released(name)
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise LinFusionFileError(f"LinFusion file '{name}' not found in {folder_paths.get_folder_paths(FOLDER)}")
    return Path(path)


class LinFusionLoader:
    CATEGORY = "loaders/LinFusion"
    DESCRIPTION = ("Loads LinFusion weights: the small distilled layers that replace a Stable Diffusion UNet's "
                   "self-attention with linear attention, for very large images. Files go in models/linfusion/.")
    RETURN_TYPES = ("LINFUSION",)
    RETURN_NAMES = ("linfusion",)
    OUTPUT_TOOLTIPS = ("LinFusion weights, to connect to Apply LinFusion.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = folder_paths.get_filename_list(FOLDER)
        return {"required": {"linfusion_name": (list(RELEASED) + files, {
            "tooltip": "A .safetensors file under models/linfusion/ (a config.json beside it is used for the layer "
                       "names), or one of the released repositories, downloaded into models/linfusion/ on first use."})}}

    def load(self, linfusion_name):
        return (load_checkpoint(resolve(linfusion_name)),)
