"""The Comfy Registry package of this pack, built the way the registry's publishing builds it: ``comfy node pack``
of comfy-cli (what ``comfy node publish`` and Comfy-Org's publish action run), which zips the git-tracked files
minus the patterns of ``.comfyignore``, plus ``[tool.comfy] includes``.

comfy-cli lives in its own environment (``.host/tools/comfy-cli``, made on first use from the package index), never
in the host's, whose pins it would fight. The package is built from a copy of the files git tracks (or would track:
not ignored), in a fresh repository, so that uncommitted work is packed as a commit would be.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

from .env import DEFAULT_HOST_DIR, REPO, log

COMFY_CLI = "comfy-cli==1.23.0"


def comfy_cli() -> Path:
    """The ``comfy`` executable of the harness's comfy-cli environment (made on first use)."""
    home = DEFAULT_HOST_DIR / "tools" / "comfy-cli"
    exe = home / "bin" / "comfy"
    stamp = home / "installed.txt"
    if exe.exists() and stamp.exists() and stamp.read_text() == COMFY_CLI:
        return exe
    log(f"installing {COMFY_CLI} into {home}")
    venv.create(home, with_pip=True, clear=True)
    subprocess.run([str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", COMFY_CLI], check=True)
    stamp.write_text(COMFY_CLI)
    return exe


def tracked_files(repo: Path = REPO) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    return sorted(f for f in out.split("\0") if f and (repo / f).is_file())


def build(dest: Path, repo: Path = REPO) -> Path:
    """Build the registry package of ``repo`` into ``dest``/node.zip; returns its path."""
    exe = comfy_cli()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "pack"
        for f in tracked_files(repo):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, work / f)
        git = ["git", "-c", "user.name=pack", "-c", "user.email=pack@localhost"]
        subprocess.run(git + ["init", "-q"], cwd=work, check=True)
        subprocess.run(git + ["add", "-A"], cwd=work, check=True)
        subprocess.run(git + ["commit", "-q", "-m", "pack"], cwd=work, check=True)
        env = dict(os.environ, HOME=tmp, XDG_CONFIG_HOME=str(Path(tmp) / "config"))
        proc = subprocess.run([str(exe), "--skip-prompt", "--no-json", "node", "pack"], cwd=work, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not (work / "node.zip").exists():
            raise RuntimeError(f"comfy node pack failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(work / "node.zip", dest / "node.zip"))


if __name__ == "__main__":
    z = build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
    print(z)
    print("\n".join(zipfile.ZipFile(z).namelist()))
