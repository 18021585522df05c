"""LinFusionSpatialParallel: a MODEL whose UNet steps run across several devices, each holding a horizontal band of
the latent (linfusion_core/parallel.py does the exact band arithmetic; this module is the ComfyUI side).

Rank 0 is this ComfyUI process, on ComfyUI's own device. The other ranks are worker processes that the node starts
on first use and keeps for the next steps and prompts (``_Pool``); they rendezvous on the loopback interface. Under
the headless launcher (launch.py, ``torchrun``) the ranks are the launcher's instead, on any number of machines.

Per UNet call (a DIFFUSION_MODEL wrapper, so ComfyUI has already scaled the input and built the ControlNet
residuals): rank 0 sends the workers the model's current weights when they changed (LoRAs and other weight patches
applied), then the step's inputs; every rank runs the UNet on its band; the output is gathered on rank 0 and goes
back to the sampler. A dead worker, a failed step or a timed-out exchange ends the prompt with an error that names
the rank and device, and the workers are stopped; the next prompt starts new ones. ComfyUI's interrupt is honoured
between steps (the workers wait idle for the next one). Workers exit with ComfyUI."""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..linfusion_core import lowmem as core_lowmem
from ..linfusion_core import parallel as par
from ..linfusion_core.layer import LinFusionAttention
from . import lowmem
from .comfy_ops import weight_and_bias

log = logging.getLogger("LinFusion")

KEY = "linfusion_spatial_parallel"
LAUNCHER_ENV = "LINFUSION_LAUNCHER"  # set by launch.py for the ComfyUI process it starts (rank 0 of its world)
TIMEOUT_ENV = "LINFUSION_PARALLEL_TIMEOUT"
# Transformer patches that are per token (local to a band): every other kind could mix tokens across bands.
LOCAL_PATCHES = {"attn2_patch", "attn2_output_patch"}
LOCAL_REPLACES = {"attn2"}
# Module attributes that hold this process's weight-patch functions; the workers get the patched weights instead.
PATCH_ATTRS = ("weight_function", "bias_function")


class ParallelError(RuntimeError):
    pass


def _timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "300"))


def parse_devices(text: str, here) -> list:
    """The node's ``devices`` text as a list of torch devices, rank 0 first; checked against ComfyUI's device."""
    names = [d.strip() for d in str(text).split(",") if d.strip()]
    if len(names) < 2:
        raise ValueError(f"LinFusion Spatial Parallel: devices={text!r} names {len(names)} device(s); give two or "
                         f"more, comma-separated, e.g. 'cuda:0,cuda:1' or 'cpu,cpu'")
    try:
        devs = [torch.device(n) for n in names]
    except RuntimeError as e:
        raise ValueError(f"LinFusion Spatial Parallel: devices={text!r}: {e}") from None
    kinds = {d.type for d in devs}
    if len(kinds) != 1 or kinds - {"cpu", "cuda"}:
        raise ValueError(f"LinFusion Spatial Parallel: devices={text!r}: all devices must be CUDA GPUs or all CPUs")
    if "cuda" in kinds:
        devs = [torch.device("cuda", 0 if d.index is None else d.index) for d in devs]
        if len(set(devs)) != len(devs):
            raise ValueError(f"LinFusion Spatial Parallel: devices={text!r} names a GPU twice")
        count = torch.cuda.device_count()
        missing = [str(d) for d in devs if d.index >= count]
        if missing:
            raise ValueError(f"LinFusion Spatial Parallel: devices={text!r}: {', '.join(missing)} not found "
                             f"({count} CUDA device(s) visible)")
    here = torch.device(here)
    if here.type == "cuda" and here.index is None:
        here = torch.device("cuda", torch.cuda.current_device())
    if devs[0] != here:
        raise ValueError(f"LinFusion Spatial Parallel: the first device ({devs[0]}) must be the one ComfyUI runs the "
                         f"model on ({here}): it is rank 0, this process")
    return devs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pack_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def _comfy_dir() -> str:
    import comfy.model_management
    return str(Path(comfy.model_management.__file__).resolve().parents[1])


def worker_command(rank: int, world: int, port: int, device: str, backend: str) -> list:
    """A worker process: launch.py's worker entry imports this pack's core under the name ComfyUI gave the pack
    (so that the modules rank 0 pickles unpickle as that process's classes), without the nodes, then runs
    parallel.worker_main."""
    return [sys.executable, str(_pack_dir() / "launch.py"), "--worker", par._pack_root(), _comfy_dir(), str(rank),
            str(world), str(port), device, backend, str(os.getpid())]


class _Pool:
    """The process group this process is rank 0 of, and the worker processes it started (none under the launcher).
    One at a time in a process (torch.distributed has one default group)."""

    def __init__(self, devices: list, launcher: bool = False):
        self.devices = devices
        self.launcher = launcher
        self.procs = []
        self.weights_key = None
        self.logged_shape = None
        self.world = len(devices)
        backend = "nccl" if devices[0].type == "cuda" else "gloo"
        timeout = timedelta(seconds=_timeout())
        if launcher:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
            self.world = dist.get_world_size()
            log.info("LinFusion spatial parallel: joined the launcher's %d ranks (%s)", self.world, backend)
            return
        port = _free_port()
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.setdefault("PYTHONUNBUFFERED", "1")
        for r, d in enumerate(devices[1:], start=1):
            p = subprocess.Popen(worker_command(r, self.world, port, str(d), backend), env=env)
            self.procs.append(p)
            log.info("LinFusion spatial parallel: started worker rank %d on %s (pid %d)", r, d, p.pid)
        box = {}

        def join():
            try:
                dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                        world_size=self.world, timeout=timeout)
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        t = threading.Thread(target=join, daemon=True)
        t.start()
        deadline = time.time() + _timeout()
        while t.is_alive():
            dead = self.dead()
            if dead or time.time() > deadline:
                self.kill()
                raise ParallelError(f"LinFusion spatial parallel: the workers did not join: "
                                    f"{dead or 'no answer within %.0f s' % _timeout()}")
            t.join(0.2)
        if "error" in box:
            self.kill()
            raise ParallelError(f"LinFusion spatial parallel: the workers did not join: {box['error']}")

    def dead(self) -> str | None:
        for r, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                return f"worker rank {r} on {self.devices[r]} (pid {p.pid}) has exited with code {p.returncode}"
        return None

    def pids(self) -> list:
        return [p.pid for p in self.procs]

    def send_weights(self, unet) -> None:
        key = _weights_key(unet)
        if key == self.weights_key:
            return
        self.weights_key = None
        t0 = time.time()
        tensors = _patched_weights(unet, getattr(unet, "dtype", None) or torch.float32)
        par.send_module(unet, tensors=tensors, drop_attrs=PATCH_ATTRS, scrub=_scrub)
        self.weights_key = key
        log.info("LinFusion spatial parallel: weights sent to %d worker rank(s) in %.1f s%s", self.world - 1,
                 time.time() - t0, f" ({len(tensors)} patched tensors)" if tensors else "")

    def step(self, unet, forward, x, timesteps, context, y, control, kwargs):
        bands = par.split_bands(x.shape[-2], x.shape[-1], self.world, par.unet_align(unet))
        args = par._to({"x": x, "timesteps": timesteps, "context": context, "y": y, "control": control,
                        "kwargs": kwargs}, "cpu")
        dist.broadcast_object_list([{"op": "step", "bands": bands, "args": args}], src=0)
        del args
        traffic = par.Traffic()
        out = par.unet_step(unet, x, timesteps, context, bands=bands, y=y, control=control, gather=True,
                            weight_fn=_norm_weights, forward=forward, traffic=traffic, **kwargs)
        shape = (tuple(x.shape), self.world)
        if shape != self.logged_shape:  # once per latent size: what a step moves
            self.logged_shape = shape
            kinds = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(traffic.bytes.items()))
            log.info("LinFusion spatial parallel: latent %s on %d ranks, band rows %s: rank 0 sent %.2f MB in this "
                     "step (%s); the step's inputs are broadcast and its output gathered on top", "x".join(
                         map(str, x.shape)), self.world, list(bands.starts), traffic.total / 1e6, kinds)
        return out

    def close(self, graceful: bool = True) -> None:
        if graceful and dist.is_initialized():
            try:
                dist.broadcast_object_list([{"op": "exit"}], src=0)
            except Exception:  # noqa: BLE001
                graceful = False
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            try:
                p.wait(5 if graceful else 0.5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                log.error("LinFusion spatial parallel: worker pid %d does not exit", p.pid)


_POOL: _Pool | None = None
_LOCK = threading.Lock()


def launched() -> bool:
    return os.environ.get(LAUNCHER_ENV) == "1" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def pool_for(devices: list) -> _Pool:
    global _POOL
    if _POOL is not None and (_POOL.launcher or _POOL.devices == devices):
        return _POOL
    if _POOL is not None:
        log.info("LinFusion spatial parallel: devices changed, stopping the workers on %s",
                 ",".join(map(str, _POOL.devices)))
        close_pool()
    if dist.is_initialized():
        raise ParallelError("LinFusion spatial parallel: torch.distributed is already in use in this process by "
                            "other code; cannot start the workers")
    _POOL = _Pool(devices, launcher=launched())
    return _POOL


def close_pool(graceful: bool = True) -> None:
    global _POOL
    pool, _POOL = _POOL, None
    if pool is not None:
        pool.close(graceful)


def _at_exit() -> None:
    if _POOL is None and launched():
        # The launcher's workers wait for rank 0 whether or not a step ran: join and let them go.
        try:
            import comfy.model_management as mm
            pool_for([mm.get_torch_device()])
        except Exception:  # noqa: BLE001
            return
    close_pool()


atexit.register(_at_exit)


# -- what the workers get ------------------------------------------------------------------------------------------

def _weights_key(unet) -> tuple:
    """Changes when a weight or a module of ``unet`` changes (object patches, LoRA patching in place or by
    replacement, weight functions added or removed)."""
    key = []
    for name, m in unet.named_modules():
        fns = tuple(id(f) for a in PATCH_ATTRS for f in (getattr(m, a, None) or ()))
        key.append((name, id(m), fns))
        for pn, p in m.named_parameters(recurse=False):
            key.append((pn, id(p), p.data_ptr(), _version(p), p.dtype))
        for bn, b in m.named_buffers(recurse=False):
            key.append((bn, id(b), b.data_ptr(), _version(b), b.dtype))
    return tuple(key)


def _version(t) -> int:
    """The in-place version counter; inference tensors have none (ComfyUI loads weights in inference mode; a LoRA
    patched in place then shows as a new tensor or a weight function)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _patched_weights(unet, dtype) -> dict:
    """{state-dict name: the weight as this process computes with it} for the modules whose weights ComfyUI patches
    on the fly (weight functions: LoRAs on a partly loaded or DynamicVRAM model), in the compute ``dtype``."""
    out = {}
    for name, m in unet.named_modules():
        if not any(getattr(m, a, None) for a in PATCH_ATTRS) or getattr(m, "weight", None) is None:
            continue
        like = torch.empty(0, dtype=dtype, device=m.weight.device)
        with weight_and_bias(m, like) as (w, b):
            prefix = f"{name}." if name else ""
            out[prefix + "weight"] = w.detach().clone()
            if b is not None and getattr(m, "bias", None) is not None:
                out[prefix + "bias"] = b.detach().clone()
    return out


def _scrub(skeleton) -> None:
    """The workers' copy runs plain ComfyUI module classes: the low-memory mode's Sequentials become plain ones
    block lists plain ModuleLists, and ResBlocks and upsamplers ComfyUI's (it stays off in a parallel step, and its classes live with the nodes)."""
    for m in skeleton.modules():
        if isinstance(m, lowmem.NormActSequential):
            m.__class__ = torch.nn.Sequential
        elif isinstance(m, lowmem.ChunkedBlockList):
            m.__class__ = torch.nn.ModuleList
        elif lowmem.is_banded_upsample(m) or lowmem.is_banded_resblock(m):  # back to ComfyUI's class
            m.__class__ = type(m).__bases__[0]


def _norm_weights(module, x):
    with weight_and_bias(module, x) as (w, b):
        return (None if w is None else w.to(dtype=x.dtype, device=x.device).clone(),
                None if b is None else b.to(dtype=x.dtype, device=x.device).clone())


def _check_options(transformer_options: dict) -> None:
    bad = [k for k, v in (transformer_options.get("patches") or {}).items() if v and k not in LOCAL_PATCHES]
    bad += [f"{k} replace" for k, v in (transformer_options.get("patches_replace") or {}).items()
            if v and k not in LOCAL_REPLACES]
    if bad:
        raise ParallelError("LinFusion spatial parallel: the model carries patches that may mix rows of the image "
                            f"({', '.join(sorted(bad))}); they cannot run split across devices. Apply Spatial "
                            "Parallel to a model without them.")


@contextlib.contextmanager
def _interrupt_after_the_step(mm):
    """ComfyUI checks its interrupt flag before every op of its layers; raised there, rank 0 would leave the step
    while the workers wait in its collectives. So the check is held back until the step is done, and made then: an
    interrupt ends the prompt within one step and the workers stay in step, ready for the next prompt (the caller
    makes the check after the step)."""
    check = mm.throw_exception_if_processing_interrupted
    mm.throw_exception_if_processing_interrupted = lambda: None
    try:
        yield
    finally:
        mm.throw_exception_if_processing_interrupted = check


class ParallelWrapper:
    """DIFFUSION_MODEL wrapper: the UNet call across the devices. Holds only the device names (ComfyUI 0.3.75
    deep-copies model options on every clone)."""

    def __init__(self, devices: str):
        self.devices = devices

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                 **kwargs):
        import comfy.model_management as mm
        unet = executor.class_obj
        _check_options(transformer_options)
        with _LOCK:
            devices = [x.device] if launched() else parse_devices(self.devices, x.device)
            pool = pool_for(devices)
            dead = pool.dead()
            if dead:
                close_pool(graceful=False)
                raise ParallelError(f"LinFusion spatial parallel: {dead}. The prompt is stopped; the next one "
                                    f"starts new workers.")

            def forward(xb, t, c, yy, ctrl, to, **kw):
                return executor(xb, t, c, yy, ctrl, transformer_options, **kw)

            try:
                with core_lowmem.enabled(False), _interrupt_after_the_step(mm):
                    pool.send_weights(unet)
                    out = pool.step(unet, forward, x, timesteps, context, y, control, kwargs)
            except mm.InterruptProcessingException:
                close_pool(graceful=False)
                raise
            except Exception as e:
                for _ in range(20):  # a crashed worker's exit can trail the error it caused here
                    if pool.dead():
                        break
                    time.sleep(0.1)
                what = pool.dead() or f"{type(e).__name__}: {e}"
                close_pool(graceful=False)
                raise ParallelError(f"LinFusion spatial parallel on {self.devices}: the step failed ({what}). The "
                                    f"workers are stopped; the next prompt starts new ones.") from e
        mm.throw_exception_if_processing_interrupted()  # held back during the step: the ranks are in step now
        return out


class LinFusionSpatialParallel:
    CATEGORY = "model_patches/LinFusion"
    DESCRIPTION = ("Runs each UNet step of the model across several devices, each holding a horizontal band of the "
                   "latent. Exact: the same image as one device (LinFusion layers exchange a small fixed-size state; "
                   "convolutions exchange one row of neighbours). The first device is ComfyUI's own; the others get "
                   "worker processes, started on first use and kept.")
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, its UNet steps split across the devices (a copy; the input model stays as it "
                       "was).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A model from Apply LinFusion (SD-1.5, SD-2.x or SD-XL)."}),
                "devices": ("STRING", {
                    "default": "cuda:0,cuda:1",
                    "tooltip": "Comma-separated devices, ComfyUI's own first: 'cuda:0,cuda:1', "
                               "'cuda:0,cuda:1,cuda:2,cuda:3', or 'cpu,cpu'. Under the LinFusion launcher (launch.py) "
                               "the launcher's ranks are used instead."}),
            },
        }

    def apply(self, model, devices):
        import comfy.model_management as mm
        import comfy.patcher_extension as pe
        if not launched():
            parse_devices(devices, mm.get_torch_device())
        m = model.clone()
        lowmem.install(m, "off")  # its per-call patches would differ between ranks; the bands are smaller anyway
        m.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY)
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, ParallelWrapper(devices))
        if not any(isinstance(obj, LinFusionAttention) for obj in m.object_patches.values()):
            log.warning("LinFusion Spatial Parallel: the model has no LinFusion layers; its softmax self-attention "
                        "runs on all-gathered keys and values (exact, but the traffic grows with the image area)")
        return (m,)
