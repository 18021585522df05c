"""Reading LinFusion files in both released layouts, and every kind of bad file, without ComfyUI."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from harness.linfusion_fixtures import diffusers_layers, write
from linfusion_core.checkpoint import LinFusionFileError, family_from_layers, load_checkpoint


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("lf") / "LinFusion-1-5"
    write("sd15", d, layout="folder", seed=1)
    return d


def test_folder_layout_reads_config_and_shapes(sd15_folder):
    ck = load_checkpoint(sd15_folder)
    assert ck.config_path == sd15_folder / "config.json"
    assert len(ck.layers) == 16 and family_from_layers(ck.layers) == "SD-1.5"
    names = [l.module_name for l in ck.layers]
    assert names == [m["module_name"] for m in diffusers_layers("sd15")]
    assert names[-1].startswith("mid_block") and names[6].startswith("up_blocks")
    assert [l.mid_dim for l in ck.layers] == [l.dim for l in ck.layers]  # SD-1.5: full-rank MLPs
    assert all(l.has_projections for l in ck.layers)


def test_single_file_layout_and_low_rank_mid_dim(tmp_path):
    st = write("sdxl", tmp_path / "renamed-xl.safetensors", layout="file", seed=2, projections=False)
    ck = load_checkpoint(st)
    assert ck.config_path is None and len(ck.layers) == 70
    assert family_from_layers(ck.layers) == "SD-XL"
    assert {(l.dim, l.mid_dim) for l in ck.layers} == {(640, 40), (1280, 80)}
    assert not any(l.has_projections for l in ck.layers)
    assert all(l.module_name is None for l in ck.layers)


def _corrupt(tmp_path, sd15_folder, name):
    src = sd15_folder / "diffusion_pytorch_model.safetensors"
    dst = tmp_path / name
    dst.write_bytes(src.read_bytes())
    return dst


def test_truncated_file(tmp_path, sd15_folder):
    p = _corrupt(tmp_path, sd15_folder, "cut.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(LinFusionFileError, match=r"cut\.safetensors.*truncated"):
        load_checkpoint(p)


def test_not_safetensors_pickle_is_refused_unread(tmp_path):
    p = tmp_path / "linfusion.safetensors"
    marker = tmp_path / "pwned"
    # A pickle whose loading would create a file: it must never be unpickled.
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(LinFusionFileError, match=r"linfusion\.safetensors.*not a safetensors file.*pickle"):
        load_checkpoint(p)
    assert not marker.exists()
    z = tmp_path / "zip.safetensors"
    torch.save({"0.to_q.weight": torch.zeros(2)}, z)
    with pytest.raises(LinFusionFileError, match=r"zip\.safetensors.*not a safetensors file"):
        load_checkpoint(z)


def test_random_bytes(tmp_path):
    p = tmp_path / "noise.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"x" * 100)
    with pytest.raises(LinFusionFileError, match=r"noise\.safetensors.*not a safetensors file"):
        load_checkpoint(p)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file
    st = write("sd15", tmp_path / "full.safetensors", layout="file")
    t = load_file(str(st))
    del t["3.to_k_.1.bias"]
    save_file(t, str(tmp_path / "missing.safetensors"))
    with pytest.raises(LinFusionFileError, match=r"missing\.safetensors.*missing tensor '3\.to_k_\.1\.bias'"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_wrong_shape_and_dtype(tmp_path):
    from safetensors.torch import load_file
    st = write("sd15", tmp_path / "full.safetensors", layout="file")
    t = load_file(str(st))
    t["5.to_q.weight"] = torch.zeros(1280, 640, dtype=torch.float16)
    save_file(t, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LinFusionFileError, match=r"shape\.safetensors.*'5\.to_q\.weight' has shape \[1280, 640\], "
                                                 r"expected \[1280, 1280\]"):
        load_checkpoint(tmp_path / "shape.safetensors")
    t = load_file(str(st))
    t["0.to_q_.0.bias"] = torch.zeros(320, dtype=torch.int64)
    save_file(t, str(tmp_path / "dtype.safetensors"))
    with pytest.raises(LinFusionFileError, match=r"dtype\.safetensors.*'0\.to_q_\.0\.bias' has dtype I64"):
        load_checkpoint(tmp_path / "dtype.safetensors")


def test_not_a_linfusion_file(tmp_path):
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(LinFusionFileError, match=r"unet\.safetensors.*not a LinFusion file"):
        load_checkpoint(tmp_path / "unet.safetensors")


def test_config_that_disagrees_with_the_tensors(tmp_path, sd15_folder):
    d = tmp_path / "bad-config"
    d.mkdir()
    (d / "diffusion_pytorch_model.safetensors").write_bytes(
        (sd15_folder / "diffusion_pytorch_model.safetensors").read_bytes())
    cfg = json.loads((sd15_folder / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({"modules_list": cfg["modules_list"][:10]}))
    with pytest.raises(LinFusionFileError, match=r"has 16 layers but its config .* lists 10"):
        load_checkpoint(d)
