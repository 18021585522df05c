"""Shared fixtures: the real ComfyUI host (a server started with this pack as a custom node), generated
checkpoints placed in its models/ folders, and in-process access to ComfyUI's own modules.

Marker ``server`` (pytest.ini): the tests that run on the ComfyUI host, i.e. start a ComfyUI server or load/sample
a model through ComfyUI's modules. Every test that uses one of HOST_FIXTURES gets it here; a test that starts a
server some other way carries ``@pytest.mark.server`` itself. ``.ci/run`` runs ``-m server`` on each further host.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness import env, fixtures  # noqa: E402
from harness.host import default_server, host_info, import_pack  # noqa: E402
from harness.peakmem import trim_heap  # noqa: E402


# Fixtures that put a test on the ComfyUI host (directly or through each other).
HOST_FIXTURES = {"host", "base_dir", "install_checkpoint", "server", "comfy_inproc", "pack"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HOST_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def host() -> dict:
    info = host_info()
    if info.get("fixtures"):  # hosts share one checkpoint cache (dev.py sets this too; tests started by hand)
        os.environ.setdefault("LINFUSION_FIXTURES_DIR", info["fixtures"])
    return info


@pytest.fixture(scope="session")
def base_dir(host) -> Path:
    return Path(host["base"])


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        if dst.stat().st_ino == src.stat().st_ino:
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture(scope="session")
def install_checkpoint(base_dir):
    """install_checkpoint("sd15") -> the ckpt_name CheckpointLoaderSimple lists for a generated checkpoint."""
    def install(name: str, folder: str = "checkpoints") -> str:
        src = fixtures.ensure(name)
        dst = base_dir / "models" / folder / f"test-{name}.safetensors"
        _link(src, dst)
        return dst.name
    return install


@pytest.fixture(scope="session")
def server(host):
    srv = default_server()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def comfy_inproc(host):
    """ComfyUI's modules imported into the test process (CPU), for tests below the graph level."""
    if not env.owns_tree(host["comfyui"]):
        sys.dont_write_bytecode = True  # never write __pycache__ into a ComfyUI tree we only read
    if host["comfyui"] not in sys.path:
        sys.path.insert(0, host["comfyui"])
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management  # noqa: F401
    return host["comfyui"]


@pytest.fixture(scope="session")
def pack(comfy_inproc):
    """This pack imported the way ComfyUI imports a custom node (as a package, relative imports and all)."""
    return import_pack("ComfyUI_LinFusion_under_test")


@pytest.fixture(scope="module", autouse=True)
def _release_models_after_module():
    """After each test module: drop the models ComfyUI still holds as loaded (its ``current_loaded_models`` keeps a
    module's true-size UNets alive after the module's fixtures are gone) and hand freed heap back to the system, so
    that the next module, and the servers beside the test process, do not start with a previous module's gigabytes
    (a fresh-clone run on a 24 GB machine ran out of memory in tests/test_workflows.py without this)."""
    yield
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.unload_all_models()
        mm.soft_empty_cache()
    trim_heap()
