#!/usr/bin/env python3
"""Gather, here, everything benchmarks/gpu_check.py needs on the GPU machine (which has no network) into
.gpu-carry/ (ignored by git), check the size of what travels, and print the device command.

  .gpu-carry/comfyui/  ComfyUI 0.33.0 copied from ../shared/hosts/comfyui-0.33.0 (that tree is read-only: it is
                       only read), without what an in-process SD-1.5 run never touches: tests, the API nodes, the
                       subgraph blueprints, docs, and the tokenizers of other model families (SD-1.5 uses
                       comfy/sd1_tokenizer). The list of what was left out is in .gpu-carry/comfyui/GPU_CARRY.txt.
  .gpu-carry/wheels/   the packages ComfyUI 0.33.0 imports on the way to an SD-1.5 run that the GPU machine's image
                       lacks (CARRY below), as wheels for CPython 3.12 manylinux x86_64 (pip download --no-deps
                       --only-binary=:all:), pinned to the versions the CPU dry run was checked with. torch, triton
                       and everything else the image has (GPU_IMAGE below) never travel.

comfy-kitchen's wheel is 58 MB, nearly all of it two compiled extensions (CUDA and ROCm kernels for fp8/fp4
quantized matmuls and int8 attention). It travels without them (repacked; its README says the package then falls
back to its triton and eager backends, which is what its own loader does when `_C` is missing). An fp16 SD-1.5
run calls none of those kernels; gpu_check records that the package was trimmed.

`python3 benchmarks/gpu_check.py --dry --emulate-gpu-image` (with ComfyUI 0.33.0's venv) runs the dry mode with
every installed package that is neither in GPU_IMAGE nor in CARRY made unimportable: that is how CARRY was found
and how it is checked.

Run it in the checkout the GPU session sends (the device tool sends the session's own checkout):

    python3 benchmarks/gpu_prepare.py [--comfyui ../shared/hosts/comfyui-0.33.0]

then, in the GPU session, the `run` call it prints (also in benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import base64
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRY_DIR = REPO / ".gpu-carry"
DEFAULT_COMFYUI = REPO.parent / "shared" / "hosts" / "comfyui-0.33.0"
LIMIT_MIB = 64
TARGET_MIB = 60

# The GPU machines' image ('cuda'), as /work/.library/device/KINDS.md lists it (read 2026-11-17).
GPU_IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())

# What travels: name -> version (ComfyUI 0.33.0's venv here). Each is imported on the way to an SD-1.5 run:
#   comfy-aimdo    execution.py and comfy.model_management (DynamicVRAM), unconditionally
#   comfy-kitchen  comfy/ldm/modules/attention.py, unconditionally (trimmed, see the docstring)
#   av             comfy_api.latest (video types), which nodes.py imports
#   torchsde, trampoline  comfy/k_diffusion/sampling.py (torchsde needs trampoline)
CARRY = {
    "comfy-aimdo": "0.4.13",
    "comfy-kitchen": "0.2.31",
    "av": "18.1.0",
    "torchsde": "0.2.6",
    "trampoline": "0.1.2",
}
# Files left out of a wheel (fnmatch patterns on the path inside the wheel).
TRIM = {"comfy-kitchen": ["comfy_kitchen/backends/cuda/_C*.so", "comfy_kitchen/backends/hip/_C*.so"]}

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]

# Left out of the ComfyUI copy (paths relative to its root; fnmatch patterns, '/'-separated).
COMFY_EXCLUDE = [
    ".git", ".github", ".ci", "tests", "tests-unit", "blueprints", "comfy_api_nodes", "script_examples",
    "models", "input", "output", "user", "temp", "custom_nodes", "alembic_db", "*.md", "openapi.yaml",
    "CODEOWNERS", "*/__pycache__", "__pycache__", "*.pyc",
    "comfy/text_encoders/*_tokenizer",  # other families' tokenizers (SD-1.5's is comfy/sd1_tokenizer)
]
COMFY_KEEP = ["LICENSE", "README.md"]

RUN_COMMAND = (
    "set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
    ".gpu-carry/wheels/*.whl && export PYTHONPATH=/tmp/site || exit 1; nvidia-smi -L; "
    "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --comfyui .gpu-carry/comfyui --work /tmp/gpucheck "
    "--out-dir $OUT --budget {budget} 2>&1 | tee $OUT/gpu_check.log"
)


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def log(msg: str) -> None:
    print(f"[gpu_prepare] {msg}", flush=True)


def excluded(rel: str) -> bool:
    if rel in COMFY_KEEP:
        return False
    return any(fnmatch.fnmatch(rel, p) for p in COMFY_EXCLUDE)


def copy_comfyui(src: Path, dst: Path) -> list:
    """Copy src to dst without the excluded paths; returns what was left out."""
    if not (src / "comfy").is_dir() or not (src / "execution.py").is_file():
        raise SystemExit(f"{src} is not a ComfyUI tree")
    if dst.exists():
        shutil.rmtree(dst)
    left_out = []
    for root, dirs, files in os.walk(src):
        rel_root = Path(root).relative_to(src).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        keep_dirs = []
        for d in sorted(dirs):
            if excluded(rel_root + d):
                left_out.append(rel_root + d + "/")
            else:
                keep_dirs.append(d)
        dirs[:] = keep_dirs
        (dst / rel_root).mkdir(parents=True, exist_ok=True)
        for f in sorted(files):
            if excluded(rel_root + f):
                left_out.append(rel_root + f)
                continue
            shutil.copy2(Path(root) / f, dst / rel_root / f)
    (dst / "GPU_CARRY.txt").write_text(
        f"Copied from {src} by benchmarks/gpu_prepare.py for the GPU check (read-only source, unmodified files).\n"
        "Left out:\n" + "".join(f"  {p}\n" for p in left_out))
    return left_out


def trim_wheel(path: Path, patterns: list) -> int:
    """Rewrite the wheel without the files matching ``patterns`` (RECORD updated). Returns bytes removed."""
    tmp = path.with_suffix(".tmp")
    removed = 0
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        gone = {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}
        for n in names:
            info = zin.getinfo(n)
            if n in gone:
                removed += info.file_size
                continue
            data = zin.read(n)
            if n.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if ln.split(",")[0] not in gone]
                data = ("\n".join(lines) + "\n").encode()
            zout.writestr(info, data)
    os.replace(tmp, path)
    return removed


def download_wheels(dest: Path) -> list:
    dest.mkdir(parents=True, exist_ok=True)
    have = {norm(p.name.split("-")[0]): p for p in dest.glob("*.whl")}
    out = []
    for name, version in CARRY.items():
        p = have.get(norm(name))
        if p is None or f"-{version}-" not in p.name:
            if p is not None:
                p.unlink()
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
            for plat in PLATFORMS:
                cmd += ["--platform", plat]
            log(f"downloading {name}=={version}")
            subprocess.run(cmd + [f"{name}=={version}"], check=True)
            p = next(q for q in dest.glob("*.whl") if norm(q.name.split("-")[0]) == norm(name))
            if name in TRIM:
                removed = trim_wheel(p, TRIM[name])
                log(f"trimmed {p.name}: {removed / 2**20:.1f} MiB of compiled extensions left out")
        out.append(p)
    extra = [p for p in dest.glob("*.whl") if norm(p.name.split("-")[0]) not in {norm(n) for n in CARRY}]
    for p in extra:
        p.unlink()
    return out


def travelling_bytes() -> tuple[int, int, int]:
    """(tracked + untracked-not-ignored files of the checkout, .gpu-carry, total) in bytes."""
    def files(*args):
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=REPO, capture_output=True, check=True).stdout
        return [REPO / f for f in out.decode().split("\0") if f]
    tree = sum(p.stat().st_size for p in files() + files("--others", "--exclude-standard") if p.is_file())
    carry = sum(p.stat().st_size for p in CARRY_DIR.rglob("*") if p.is_file())
    return tree, carry, tree + carry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", type=Path, default=DEFAULT_COMFYUI, help="ComfyUI 0.33.0 tree to copy")
    ap.add_argument("--budget", type=int, default=480, help="gpu_check's budget in the printed command (s)")
    ap.add_argument("--print-command", action="store_true", help="only print the device command")
    args = ap.parse_args(argv)
    cmd = RUN_COMMAND.format(budget=args.budget)
    if not args.print_command:
        ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu-carry/x"], cwd=REPO).returncode == 0
        if not ignored:
            raise SystemExit(".gpu-carry/ is not ignored by git here; add '/.gpu-carry/' to .gitignore first")
        left_out = copy_comfyui(args.comfyui.resolve(), CARRY_DIR / "comfyui")
        log(f"copied ComfyUI from {args.comfyui} ({len(left_out)} paths left out, see GPU_CARRY.txt)")
        wheels = download_wheels(CARRY_DIR / "wheels")
        for w in wheels:
            log(f"wheel {w.name} ({w.stat().st_size / 2**20:.1f} MiB)")
        tree, carry, total = travelling_bytes()
        log(f"travels: checkout {tree / 2**20:.1f} MiB + .gpu-carry {carry / 2**20:.1f} MiB = "
            f"{total / 2**20:.1f} MiB (limit {LIMIT_MIB} MiB)")
        if total > TARGET_MIB * 2**20:
            raise SystemExit(f"too large: {total / 2**20:.1f} MiB > {TARGET_MIB} MiB")
    print()
    print("Device call (GPU session; about 8.5 minutes of device time plus the machine's start):")
    print(f"  run(kind='nvidia-h100-x1', timeout_s=570, carry=['.gpu-carry'],\n      command={cmd!r})")
    print(f"  ({len(cmd)} characters.) Then copy gpu_check_*.json/.md from the reply's files into benchmarks/results/.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
