"""The Slicer extension description (.s4ext) mirrors CMakeLists.txt; the layout DESIGN.md requires exists."""

from __future__ import annotations

import re

from conftest import REPO


def _cmake_extension_fields() -> dict[str, str]:
    text = (REPO / "CMakeLists.txt").read_text()
    return {m[0]: m[1] for m in re.findall(r'set\(EXTENSION_(\w+) "([^"]*)"\)', text)}


def _s4ext_fields() -> dict[str, str]:
    fields = {}
    for line in (REPO / "MedVLSAM2.s4ext").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def test_s4ext_mirrors_cmake_metadata():
    cmake, s4ext = _cmake_extension_fields(), _s4ext_fields()
    pairs = {
        "HOMEPAGE": "homepage",
        "CATEGORY": "category",
        "CONTRIBUTORS": "contributors",
        "DESCRIPTION": "description",
        "ICONURL": "iconurl",
        "DEPENDS": "depends",
        "SCREENSHOTURLS": "screenshoturls",
    }
    for cmake_key, s4ext_key in pairs.items():
        assert cmake[cmake_key] == s4ext[s4ext_key], cmake_key
    assert "project(MedVLSAM2)" in (REPO / "CMakeLists.txt").read_text()


def test_repository_layout_matches_the_design():
    for path in [
        "MedVLSAM2/MedVLSAM2.py",
        "MedVLSAM2/CMakeLists.txt",
        "MedVLSAM2/Resources/Icons/MedVLSAM2.png",
        "MedVLSAM2Lib/CMakeLists.txt",
        "Training",
        "Testing",
        "LICENSE.txt",
        ".ci/run",
        "Makefile",
    ]:
        assert (REPO / path).exists(), path
    assert "WITH_GENERIC_TESTS" in (REPO / "MedVLSAM2" / "CMakeLists.txt").read_text()
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "Apache License" in (REPO / "LICENSE.txt").read_text()
