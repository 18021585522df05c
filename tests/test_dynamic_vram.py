"""DynamicVRAM (ComfyUI 0.33+, ``ModelPatcherDynamic``, on by default on NVIDIA) and multi-GPU clones, replayed on
CPU with the host's own ModelPatcher code and a generated UNet with the true SD-1.5 architecture.

What cannot exist here is mocked, and only that: ModelPatcherDynamic needs a CUDA device, and its constructor hands
CPU models to the classic patcher, so the tests let it construct on CPU (its ``_vbar_get`` already returns no VBAR
for a CPU device), with an empty stand-in for comfy-aimdo's pinned host buffer (its native library needs CUDA), and
with ``partially_unload`` reduced to what it does when there is no VBAR to free (its first line asserts a non-CPU
device): ``restore_loaded_backups()``. Everything else, load_models_gpu, load/partially_load/detach/unpatch and the shared backup dicts,
is the host's own code. On hosts without ModelPatcherDynamic (0.3.75) the tests skip; CI runs them on 0.33.0.
"""
from __future__ import annotations

import pytest
import torch

from harness import fixtures, linfusion_fixtures

pytestmark = pytest.mark.server

SIGMA = torch.tensor([1.5])


class _NoPinnedMemory:
    """Stand-in for comfy_aimdo.host_buffer.HostBuffer (CUDA pinned host memory): holds nothing."""
    def __init__(self, *args, **kwargs):
        self.size = 0

    def truncate(self, *args, **kwargs):
        pass


def _inputs(seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, hw, hw, generator=g), torch.randn(1, 77, 768, generator=g)


@pytest.fixture(scope="module")
def dyn(comfy_inproc, pack, tmp_path_factory):
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    cls = getattr(mp, "ModelPatcherDynamic", None)
    if cls is None:
        pytest.skip("this ComfyUI has no ModelPatcherDynamic (it came with 0.33); CI runs this file on 0.33.0")
    import comfy_aimdo.host_buffer
    mpatch = pytest.MonkeyPatch()
    # The mocks: construct on CPU instead of rerouting to the classic patcher (clone() goes through it too), and
    # an empty pinned-memory buffer.
    mpatch.setattr(cls, "__new__", lambda c, *a, **k: object.__new__(c))
    mpatch.setattr(comfy_aimdo.host_buffer, "HostBuffer", _NoPinnedMemory)
    mpatch.setattr(cls, "partially_unload", lambda self, *a, **k: self.restore_loaded_backups())
    classic = fixtures.load_unet("sd15")  # ComfyUI's real loader
    cpu = torch.device("cpu")
    plain = cls(classic.model, load_device=cpu, offload_device=cpu, size=classic.model_size())
    plain.cached_patcher_init = getattr(classic, "cached_patcher_init", None)  # what the core loader registered
    assert plain.is_dynamic()
    path = linfusion_fixtures.write("sd15", tmp_path_factory.mktemp("lf") / "lf.safetensors", layout="file", seed=4)
    ckpt = pack.linfusion_core.checkpoint.load_checkpoint(path)
    yield {"plain": plain, "ckpt": ckpt, "pack": pack, "cls": cls}
    mm.unload_all_models()
    mpatch.undo()


def run(m, x, c):
    import comfy.model_management as mm
    mm.load_models_gpu([m])
    to = dict(m.model_options.get("transformer_options", {}))
    with torch.no_grad():
        return m.model.apply_model(x, SIGMA, c_crossattn=c, transformer_options=to).float()


def test_plain_model_survives_linfusion_runs_and_unloads(dyn):
    """Sample patched, then plain from the same checkpoint, then patched again, then a full unload: nothing raises
    and the plain model's output is bit-identical to its output before any LinFusion run."""
    import comfy.model_management as mm
    patching = dyn["pack"].nodes.patching
    plain = dyn["plain"]
    x, c = _inputs()
    before = run(plain, x, c)

    lf = patching.apply_linfusion(plain, dyn["ckpt"])
    assert isinstance(lf, dyn["cls"])
    out_lf = run(lf, x, c)
    own = [k for k in plain.backup if ".attn1.linfusion." in k]
    assert own, "the dynamic load should have backed up LinFusion's small layers (else this replay tests nothing)"

    after_lf = run(plain, x, c)  # a plain clone loads next: ComfyUI detaches the LinFusion clone first
    assert torch.equal(after_lf, before)
    assert not any(".linfusion." in k for k in plain.backup)

    again = run(lf, x, c)
    assert torch.equal(again, out_lf)
    assert not torch.allclose(out_lf, before)  # the LinFusion clone really ran LinFusion

    mm.unload_all_models()  # "Unload models" / POST /free: detach with a full unpatch
    assert not plain.backup and not plain.object_patches_backup
    assert torch.equal(run(plain, x, c), before)
    mm.unload_all_models()


def test_multigpu_clone_runs_linfusion_on_its_own_copy(dyn):
    """ModelPatcher.deepclone_multigpu (ComfyUI's MultiGPU) builds a patcher over a fresh copy of the model; its
    LinFusion layers must sit on that copy's modules and give the same output as the original patched model."""
    import comfy.model_management as mm
    plain = dyn["plain"]
    assert plain.cached_patcher_init is not None  # ComfyUI 0.33's loaders register it (multi-GPU needs it)
    lf = dyn["pack"].nodes.patching.apply_linfusion(plain, dyn["ckpt"])
    x, c = _inputs(1)
    ref = run(lf, x, c)
    mm.unload_all_models()
    clone = lf.deepclone_multigpu(new_load_device=torch.device("cpu"))
    assert clone.model is not lf.model
    patches = dyn["pack"].nodes.lifecycle.our_patches(clone)
    assert patches and len(patches) == len(dyn["pack"].nodes.lifecycle.our_patches(lf))
    own_modules = {id(mod) for mod in clone.model.modules()}
    for key, obj in patches.items():
        base = getattr(obj, "_base")
        assert id(base) in own_modules, key  # built over the copy's layer, not the original's
    assert torch.equal(run(clone, x, c), ref)
    mm.unload_all_models()


def run_sampling(m, x, c):
    """``run`` with the patcher's wrappers merged into transformer_options, as ComfyUI's sampler hands them on (the
    low-memory mode is an APPLY_MODEL wrapper)."""
    import comfy.model_management as mm
    mm.load_models_gpu([m])
    with torch.no_grad():
        to = fixtures.sampling_options(m)
        return m.model.apply_model(x, SIGMA, c_crossattn=c, transformer_options=to).float()


def test_low_memory_mode_under_dynamic_vram(dyn, monkeypatch):
    """The low-memory mode's object patches (ResBlocks, upsamplers, transformer block lists) under DynamicVRAM: the
    mode on equals it off bit for bit with every piece small enough to run in pieces (single-threaded: with
    several threads oneDNN may split a band's 1x1 convolution otherwise than the whole tensor's, as
    tests/test_lowmem.py measures), the plain model gives its
    own output again afterwards and holds ComfyUI's modules, and a multi-GPU copy gets the mode's modules over
    its own layers and the same output."""
    import comfy.model_management as mm
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    pack = dyn["pack"]
    NL = pack.nodes.lowmem
    small = 1 << 12
    monkeypatch.setattr(NL, "BAND_ELEMENTS", small)
    monkeypatch.setattr(NL.NormActSequential, "chunk_elements", small)
    monkeypatch.setattr(pack.linfusion_core.layer.LinFusionAttention, "chunk_elements", small)
    calls = []
    chunked = NL.transformer_block_in_chunks

    def counted(*a, **k):
        calls.append(1)
        return chunked(*a, **k)
    monkeypatch.setattr(NL, "transformer_block_in_chunks", counted)
    plain = dyn["plain"]
    x, c = _inputs(2, hw=24)  # the smallest level 3x3: every block above two chunks
    before = run(plain, x, c)
    with fixtures.torch_threads(1):
        outs = {mode: run_sampling(pack.nodes.patching.apply_linfusion(plain, dyn["ckpt"], 0, mode), x, c)
                for mode in ("off", "on")}
    assert len(calls) == 16 and torch.equal(outs["on"], outs["off"])
    mm.unload_all_models()
    assert torch.equal(run(plain, x, c), before)
    dm = plain.model.diffusion_model
    assert type(dm.input_blocks[1][0]) is ResBlock
    assert type(dm.input_blocks[1][1].transformer_blocks) is torch.nn.ModuleList
    mm.unload_all_models()

    def mode_patches(p):
        return {k: v for k, v in p.object_patches.items()
                if NL.is_banded_resblock(v) or NL.is_banded_upsample(v) or isinstance(v, NL.ChunkedBlockList)}
    on = pack.nodes.patching.apply_linfusion(plain, dyn["ckpt"], 0, "on")
    clone = on.deepclone_multigpu(new_load_device=torch.device("cpu"))
    ours = mode_patches(clone)
    assert len(ours) == len(mode_patches(on)) == 22 + 3 + 16
    params = {id(p) for p in clone.model.parameters()}
    for key, obj in ours.items():
        if isinstance(obj, NL.ChunkedBlockList):
            assert obj._modules is comfy.utils.get_attr(clone.model, key)._modules, key
        else:
            assert all(id(p) in params for p in obj.parameters()), key  # the copy's weights
    calls.clear()
    with fixtures.torch_threads(1):
        assert torch.equal(run_sampling(clone, x, c), outs["on"]) and len(calls) == 16
    mm.unload_all_models()
