"""House rule 2: the library imports without torch, and the Slicer module imports nothing heavy at top level."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

LIGHT_MODULES = [
    "MedVLSAM2Lib",
    "MedVLSAM2Lib.errors",
    "MedVLSAM2Lib.config",
    "MedVLSAM2Lib.jsonfile",
    "MedVLSAM2Lib.volume",
    "MedVLSAM2Lib.prompts",
    "MedVLSAM2Lib.preprocess",
    "MedVLSAM2Lib.segmentation",
    "MedVLSAM2Lib.templates",
    "MedVLSAM2Lib.terminology",
    "MedVLSAM2Lib.metrics",
    "MedVLSAM2Lib.demo",
    "MedVLSAM2Lib.evaluation.choice",
    "MedVLSAM2Lib.results",
    "MedVLSAM2Lib.serving.protocol",
    "MedVLSAM2Lib.serving.client",
    "MedVLSAM2Lib.data.ctrate",
    "MedVLSAM2Lib.data.m3dseg",
    "MedVLSAM2Lib.cli",
]
HEAVY = ("torch", "transformers", "peft", "sam2", "monai", "accelerate")


def test_library_modules_import_with_heavy_packages_blocked():
    blocker = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in HEAVY)
    code = blocker + "".join(f"import {m}\n" for m in LIGHT_MODULES) + "print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_model_modules_import_without_touching_sam2():
    """sam2 initialises Hydra when imported: only building a segmenter may import it."""
    code = "import sys\nimport MedVLSAM2Lib.model.weights\nprint('sam2' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_slicer_module_top_level_imports_are_stdlib_and_slicer_only():
    tree = ast.parse((REPO / "MedVLSAM2" / "MedVLSAM2.py").read_text())
    allowed = set(sys.stdlib_module_names) | {"slicer", "qt", "ctk", "vtk"}
    for node in tree.body:
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [(node.module or "").split(".")[0]]
        else:
            continue
        assert set(roots) <= allowed, f"top-level import of {roots} in MedVLSAM2.py"


def test_library_never_imports_slicer_toolkits():
    for path in (REPO / "MedVLSAM2Lib").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [(node.module or "").split(".")[0]]
            assert not set(names) & {"slicer", "qt", "ctk", "vtk"}, f"{path.name} imports {names}"
