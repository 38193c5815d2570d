"""Static checks of the Slicer extension package: CMake lists every file, the catalog entry agrees with CMake and
follows the ExtensionsIndex schema rules, the module's widget names exist in its .ui, its requirements match
pyproject.toml, and its Qt-free logic imports without torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import tomllib
from conftest import REPO
from test_extension_metadata import _cmake_extension_fields, _s4ext_fields

sys.path.insert(0, str(REPO / "MedVLSAM2"))
from MedVLSAM2Core.dependencies import LOCAL_REQUIREMENTS, REMOTE_REQUIREMENTS, TORCH_MINIMUM  # noqa: E402

SCHEMA = (
    "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
)
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                "build_subdirectory", "dicom_support_rule", "enabled", "tier"}  # fmt: skip


def _cmake_list(path, variable: str) -> set[str]:  # noqa: ANN001
    text = path.read_text()
    block = re.search(rf"set\({variable}\n(.*?)\)", text, re.S)
    assert block, f"{path}: no set({variable} …)"
    return {item.replace("${MODULE_NAME}", "MedVLSAM2") for item in block.group(1).split()}


def _files(root, pattern: str, skip: tuple[str, ...] = ()) -> set[str]:  # noqa: ANN001
    return {str(p.relative_to(root)) for p in root.rglob(pattern)
            if "__pycache__" not in p.parts and not str(p.relative_to(root)).startswith(skip)}  # fmt: skip


def test_cmake_lists_every_script_and_resource():
    module, library = REPO / "MedVLSAM2", REPO / "MedVLSAM2Lib"
    assert _cmake_list(module / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS") == _files(module, "*.py")
    resources = _files(module / "Resources", "*.*")
    assert _cmake_list(module / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES") == {f"Resources/{r}" for r in resources}
    assert _cmake_list(library / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS") == _files(library, "*.py")
    assert _cmake_list(library / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES") == _files(library, "resources/*")
    assert [p.name for p in module.glob("*.py")] == ["MedVLSAM2.py"]  # Slicer loads every top-level .py as a module
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in (module / "CMakeLists.txt").read_text()
    assert "\nclass MedVLSAM2Test(ScriptedLoadableModuleTest):" in (module / "MedVLSAM2.py").read_text()


def test_catalog_entry_follows_the_schema_and_agrees_with_cmake():
    entry = json.loads((REPO / "MedVLSAM2.json").read_text())
    cmake, s4ext = _cmake_extension_fields(), _s4ext_fields()
    assert set(entry) <= CATALOG_KEYS and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"] == SCHEMA
    assert entry["category"] == cmake["CATEGORY"] == s4ext["category"]
    assert entry["build_dependencies"] == cmake["DEPENDS"].split() == s4ext["depends"].split()
    assert entry["scm_url"] == s4ext["scmurl"] and re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+\.git",
                                                                entry["scm_url"])  # fmt: skip
    assert entry["scm_revision"] == s4ext["scmrevision"] and entry["tier"] in (1, 3, 5)
    assert entry["build_subdirectory"] == s4ext["build_subdirectory"]
    assert "licence" in cmake["DESCRIPTION"] and "Qwen research licence" in cmake["DESCRIPTION"]


def test_every_widget_the_module_uses_exists_in_its_ui_file():
    tree = ElementTree.parse(REPO / "MedVLSAM2" / "Resources" / "UI" / "MedVLSAM2.ui")
    names = {w.get("name") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (REPO / "MedVLSAM2" / "MedVLSAM2.py").read_text()))
    assert used and used <= names, f"not in the .ui: {sorted(used - names)}"
    assert {"reportButton", "askButton", "segmentButton", "refineButton", "undoButton", "cancelButton"} <= used


def test_module_requirements_match_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=]", spec)[0].lower(): spec for spec in project["dependencies"]}
    for spec in LOCAL_REQUIREMENTS:
        name = re.split(r"[<>=]", spec)[0].lower()
        assert declared.get(name) == spec, f"{spec} differs from pyproject.toml ({declared.get(name)})"
    assert set(map(str.lower, REMOTE_REQUIREMENTS)) <= set(map(str.lower, declared.values()))
    torch = next(spec for spec in project["dependencies"] if spec.startswith("torch"))
    assert torch == f"torch>={TORCH_MINIMUM}"


def test_qt_free_logic_imports_without_heavy_packages():
    blocker = "".join(f"sys.modules[{name!r}] = None\n" for name in ("torch", "transformers", "peft", "sam2", "monai"))
    code = (f"import sys\n{blocker}sys.path.insert(0, {str(REPO / 'MedVLSAM2')!r})\n"
            "import MedVLSAM2Core\nprint('ok')")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_prompt_completion_offers_only_names_with_terminology():
    from MedVLSAM2Lib.terminology import lookup, structure_names

    names = structure_names()
    assert {"liver", "spleen", "left lung", "right lung"} <= set(names) and names == sorted(names)
    assert all(lookup(name) is not None for name in names)


def test_every_bound_widget_has_a_parameter_of_its_type():
    """The .ui widgets bind to the parameter node by ``SlicerParameterName``; parameterNodeWrapper fails at module
    load on a name it lacks, so every name must be a field of ``MedVLSAM2ParameterNode`` of the widget's kind."""
    import ast

    tree = ElementTree.parse(REPO / "MedVLSAM2" / "Resources" / "UI" / "MedVLSAM2.ui")
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = (widget.get("class"), widget)
    module = ast.parse((REPO / "MedVLSAM2" / "MedVLSAM2.py").read_text())
    (node_class,) = [n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "MedVLSAM2ParameterNode"]
    assert [ast.unparse(d) for d in node_class.decorator_list] == ["parameterNodeWrapper"]
    fields = {n.target.id: ast.unparse(n.annotation) for n in node_class.body if isinstance(n, ast.AnnAssign)}
    assert set(bound) == set(fields), f"bound {sorted(bound)} vs fields {sorted(fields)}"
    kinds = {"qMRMLNodeComboBox": None, "QLineEdit": "str", "QCheckBox": "bool"}
    for name, (widget_class, widget) in bound.items():
        if widget_class == "qMRMLNodeComboBox":
            types = {s.text for s in widget.find("property[@name='nodeTypes']").iter("string")}
            assert types == {fields[name]}, f"{name}: the combo shows {types}, the parameter holds {fields[name]}"
        else:
            assert kinds[widget_class] == fields[name], f"{name}: a {widget_class} cannot hold {fields[name]}"
