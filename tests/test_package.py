"""What a user installs. The Comfy Registry package, built as the registry's publishing builds it (comfy-cli's
``comfy node pack``: git-tracked files minus ``.comfyignore``), holds the product and nothing of the lab; the
product imports nothing from the lab; and the package, unpacked on its own, is a working custom node.

comfy-cli comes from the package index into its own environment on first use (harness/registry_package.py)."""
from __future__ import annotations

import ast
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

from harness import registry_package

REPO = Path(__file__).resolve().parent.parent
# The product as the issue that split it defines it (not read from .comfyignore, which is what is tested).
PRODUCT_FILES = {"__init__.py", "launch.py", "pyproject.toml", "README.md", "LICENSE", "requirements.txt"}
PRODUCT_DIRS = ("nodes/", "linfusion_core/", "workflows/")
LAB_MODULES = {"harness", "tests", "benchmarks", "dev", "conftest"}


def is_product(path: str) -> bool:
    return path in PRODUCT_FILES or path.startswith(PRODUCT_DIRS)


@pytest.fixture(scope="module")
def registry_zip(tmp_path_factory) -> Path:
    return registry_package.build(tmp_path_factory.mktemp("registry"))


def test_registry_package_holds_only_the_product(registry_zip):
    with zipfile.ZipFile(registry_zip) as f:
        package = sorted(f.namelist())
    print("registry package:\n  " + "\n  ".join(package))
    tracked = registry_package.tracked_files()
    assert set(package) == {f for f in tracked if is_product(f)}
    lab = [f for f in tracked if not is_product(f)]
    assert lab and not set(lab) & set(package)  # the lab exists in the repository, and none of it ships
    assert {f"nodes/{p.name}" for p in (REPO / "nodes").glob("*.py")} <= set(package)
    assert {f"workflows/{p.name}" for p in (REPO / "workflows").glob("*.json")} <= set(package)


def _imported_roots(path: Path) -> set[str]:
    """Top-level names a file imports: ``import x.y`` -> x; ``from .. import x`` or ``from ..x import y`` in a file
    whose ``..`` is the pack's root -> x (relative imports that stay below the root name product modules)."""
    roots, pkg = set(), path.parent.relative_to(REPO).parts
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level - 1 >= len(pkg):  # resolves to the pack's root
            roots |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return roots


def test_product_imports_nothing_from_the_lab():
    product_py = [p for p in REPO.rglob("*.py") if is_product(p.relative_to(REPO).as_posix())]
    assert len(product_py) > 10
    bad = {p.relative_to(REPO).as_posix(): sorted(_imported_roots(p) & LAB_MODULES) for p in product_py}
    assert not {k: v for k, v in bad.items() if v}


def test_unpacked_package_is_a_working_custom_node(registry_zip, tmp_path, pack):
    """The zip, unpacked into a fresh custom_nodes folder, imports as ComfyUI imports a custom node and registers the
    same nodes as the repository checkout."""
    dest = tmp_path / "custom_nodes" / "comfyui-linfusion"
    with zipfile.ZipFile(registry_zip) as f:
        f.extractall(dest)
    name = "comfyui_linfusion_from_registry_zip"
    spec = importlib.util.spec_from_file_location(name, dest / "__init__.py", submodule_search_locations=[str(dest)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        assert set(mod.NODE_CLASS_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS) and mod.NODE_CLASS_MAPPINGS
        assert mod.NODE_DISPLAY_NAME_MAPPINGS == pack.NODE_DISPLAY_NAME_MAPPINGS
        assert Path(mod.nodes.patching.__file__).is_relative_to(dest)
    finally:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
