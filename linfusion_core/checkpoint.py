"""Reading LinFusion weight files: a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``
(the released layout), or a lone ``.safetensors`` (renamed or exported on its own).

Only safetensors are read, never pickles. Every problem raises LinFusionFileError naming the file."""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

MLP_PARAMS = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
PROJ_PARAMS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
ALLOWED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_KEY = re.compile(r"^(\d+)\.(.+)$")
MAX_HEADER = 100 * 2**20


class LinFusionFileError(ValueError):
    """A LinFusion file that cannot be used; the message names the file and what is wrong."""


@dataclass
class LayerWeights:
    index: int
    dim: int                    # C (dim_n)
    mid_dim: int                # M of the residual MLPs, read from the tensor shapes
    has_projections: bool       # own to_q/to_k/to_v/to_out, else the base layer's are reused
    module_name: str | None = None   # diffusers path from config.json, if any
    heads: int | None = None         # from config.json, if any (the model's own count is what is used)
    tensors: dict = field(default_factory=dict, repr=False)


@dataclass
class LinFusionCheckpoint:
    path: Path
    config_path: Path | None
    layers: list

    @property
    def name(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"{len(self.layers)} layers, {family_from_layers(self.layers)}"


def family_from_layers(layers) -> str:
    """Best guess of the base family a LinFusion file was made for, from its layer count and widths."""
    dims = [l.dim for l in layers]
    n = len(dims)
    if n == 70 and set(dims) == {640, 1280}:
        return "SD-XL"
    if n == 16 and set(dims) == {320, 640, 1280}:
        heads = {l.heads for l in layers if l.heads}
        if heads == {8}:
            return "SD-1.5"
        if heads and heads <= {5, 10, 20}:
            return "SD-2.x"
        return "SD-1.5/SD-2.x"
    return f"unknown architecture (widths {sorted(set(dims))})"


def _fail(path, msg) -> LinFusionFileError:
    return LinFusionFileError(f"LinFusion file '{path}': {msg}")


def read_safetensors_header(path: Path) -> dict:
    """Validate the safetensors framing (header, offsets vs. file size, dtypes) before touching tensors."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"not a safetensors file (only {size} bytes)")
            if head[:2] == b"PK" or head[:1] == b"\x80":
                raise _fail(path, "not a safetensors file: it is a PyTorch pickle/zip checkpoint. LinFusion loads only "
                                  ".safetensors and never unpickles files; convert it to safetensors first")
            (n,) = struct.unpack("<Q", head)
            if n <= 1 or n > MAX_HEADER or 8 + n > size:
                raise _fail(path, "not a safetensors file (no valid header)" if 8 + n > size or n > MAX_HEADER
                            else "empty safetensors header")
            raw = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot be read: {e}") from None
    try:
        header = json.loads(raw)
    except ValueError:
        raise _fail(path, "not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file (header is not a table)")
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype = info["dtype"]
            shape = info["shape"]
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"malformed entry for tensor '{key}'") from None
        if end > data_size:
            raise _fail(path, f"truncated: tensor '{key}' ends at byte {end} but the file holds only {data_size} "
                              f"bytes of data (incomplete download?)")
        if dtype not in ALLOWED_DTYPES:
            raise _fail(path, f"tensor '{key}' has dtype {dtype}; expected one of F32, F16, BF16")
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * _DTYPE_BYTES.get(dtype, 0):
            raise _fail(path, f"tensor '{key}' has {end - start} bytes for shape {shape} {dtype}")
    return header


def find_config(path: Path) -> Path | None:
    cfg = path.parent / "config.json"
    return cfg if cfg.is_file() else None


def _read_config(cfg: Path) -> list:
    try:
        data = json.loads(cfg.read_text())
        modules = data["modules_list"]
        assert isinstance(modules, list)
        return modules
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise LinFusionFileError(f"LinFusion config '{cfg}': no usable 'modules_list' ({type(e).__name__}: {e})") from None


def resolve_path(path) -> Path:
    """A folder in the released layout resolves to its safetensors file."""
    p = Path(path)
    if p.is_dir():
        cands = [p / "diffusion_pytorch_model.safetensors"] + sorted(p.glob("*.safetensors"))
        for c in cands:
            if c.is_file():
                return c
        raise LinFusionFileError(f"LinFusion folder '{p}': no .safetensors file inside "
                                 f"(expected diffusion_pytorch_model.safetensors beside config.json)")
    if not p.is_file():
        raise LinFusionFileError(f"LinFusion file '{p}' does not exist")
    return p


def load_checkpoint(path, config_path=None) -> LinFusionCheckpoint:
    path = resolve_path(path)
    header = read_safetensors_header(path)
    cfg_path = Path(config_path) if config_path else find_config(path)
    modules = _read_config(cfg_path) if cfg_path else None

    grouped: dict[int, set] = {}
    for key in header:
        if key == "__metadata__":
            continue
        m = _KEY.match(key)
        if not m:
            raise _fail(path, f"unexpected tensor '{key}': this is not a LinFusion file (tensors are named "
                              f"'<layer>.<param>', e.g. '0.to_q_.0.weight')")
        grouped.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not grouped:
        raise _fail(path, "holds no tensors")
    count = max(grouped) + 1
    missing_layers = [i for i in range(count) if i not in grouped]
    if missing_layers:
        raise _fail(path, f"layers {missing_layers[:5]} are missing (indices must run 0..{count - 1})")
    if modules is not None and len(modules) != count:
        raise _fail(path, f"has {count} layers but its config '{cfg_path}' lists {len(modules)}")

    from safetensors import safe_open
    layers = []
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for i in range(count):
            names = grouped[i]
            need = [f"{mlp}.{p}" for mlp in ("to_q_", "to_k_") for p in MLP_PARAMS]
            miss = [n for n in need if n not in names]
            if miss:
                raise _fail(path, f"missing tensor '{i}.{miss[0]}'" + (f" (+{len(miss) - 1} more)" if len(miss) > 1 else ""))
            has_proj = any(p in names for p in PROJ_PARAMS)
            if has_proj:
                miss = [p for p in PROJ_PARAMS if p not in names]
                if miss:
                    raise _fail(path, f"missing tensor '{i}.{miss[0]}' (layer {i} has some of its projections only)")
            wanted = need + (list(PROJ_PARAMS) if has_proj else [])
            extra = sorted(names - set(wanted))
            if extra:
                raise _fail(path, f"unexpected tensor '{i}.{extra[0]}'")
            tensors = {n: f.get_tensor(f"{i}.{n}") for n in wanted}
            mid, dim = tensors["to_q_.0.weight"].shape
            layer = LayerWeights(index=i, dim=int(dim), mid_dim=int(mid), has_projections=has_proj, tensors=tensors)
            _check_shapes(path, layer)
            if modules is not None:
                entry = modules[i]
                layer.module_name = entry.get("module_name")
                layer.heads = entry.get("heads")
                if entry.get("dim_n") not in (None, layer.dim):
                    raise _fail(path, f"layer {i} is {layer.dim} wide but config.json says dim_n={entry.get('dim_n')}")
            layers.append(layer)
    return LinFusionCheckpoint(path=path, config_path=cfg_path, layers=layers)


def _check_shapes(path, layer: LayerWeights) -> None:
    C, M, i = layer.dim, layer.mid_dim, layer.index
    expect = {}
    for mlp in ("to_q_", "to_k_"):
        expect.update({f"{mlp}.0.weight": (M, C), f"{mlp}.0.bias": (M,), f"{mlp}.1.weight": (M,), f"{mlp}.1.bias": (M,),
                       f"{mlp}.3.weight": (C, M), f"{mlp}.3.bias": (C,)})
    if layer.has_projections:
        expect.update({"to_q.weight": (C, C), "to_k.weight": (C, C), "to_v.weight": (C, C),
                       "to_out.0.weight": (C, C), "to_out.0.bias": (C,)})
    for name, shape in expect.items():
        got = tuple(layer.tensors[name].shape)
        if got != shape:
            raise _fail(path, f"tensor '{i}.{name}' has shape {list(got)}, expected {list(shape)} "
                              f"(layer width {C}, MLP width {M})")
