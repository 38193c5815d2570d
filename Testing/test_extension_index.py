"""The Slicer Extensions Index accepts the extension: its own checks, reproduced offline.

Source: ``Slicer/ExtensionsIndex`` at commit 07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c (2026-08-07),
``scripts/check_description_files.py`` (run by ``.github/workflows/extension-validation.yml`` on every changed
``<Extension>.json``) and ``schemas/slicer-extension-catalog-entry-schema-v1.0.2.json`` (copied to
``Testing/fixtures/extensions_index/``). Each test names the check it reproduces; regular expressions and lists
are the index's own. Checks that need the network are reproduced as far as the repository allows:

- ``validate_image_url`` (icon and screenshots) downloads each URL and wants an image Content-Type. Here: the URL
  is a raw.githubusercontent.com address of this repository (owner/name of ``scm_url``) on ``scm_revision``,
  the path exists in the working tree, is not git-ignored (so it is committed), and is a real PNG.
- ``check_clone_repository`` / ``check_repository_size`` clone ``scm_url``: here the size of the files git
  would check out (tracked and not ignored) is summed against the same 100 MB limit.
- ``check_json_schema`` downloads the ``$schema`` URL: here the copied schema (same ``$id``) is applied.
- ``check_dependencies`` looks for ``<dependency>.json`` in the index: ``PyTorch.json`` is there at that commit.
- ``check_git_repository_topics`` asks the GitHub API for the ``3d-slicer-extension`` topic: not reproducible
  offline (a repository setting, not a file): add the topic on GitHub before submitting.

Files as the index names them: the description is ``MedVLSAM2.json`` (extension name = file stem), the
repository's top-level ``CMakeLists.txt``. ``test_extension_metadata.py`` checks that MedVLSAM2.s4ext mirrors
CMake (screenshot URLs included); ``test_extension_package.py`` checks the catalog entry's keys against CMake.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import urllib.parse as urlparse
from pathlib import Path

import pytest
from conftest import REPO

INDEX_COMMIT = "07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c"
SCHEMA_FILE = REPO / "Testing" / "fixtures" / "extensions_index" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
DESCRIPTION = REPO / "MedVLSAM2.json"
EXTENSION_NAME = DESCRIPTION.stem
SCREENSHOT_SCRIPT = REPO / "Screenshots" / "make_screenshots.py"
MAX_SCREENSHOT_BYTES = 300_000
REPOSITORY_SIZE_LIMIT_MB = 100  # check_repository_size
INDEX_EXTENSIONS_WE_DEPEND_ON = {"PyTorch"}  # PyTorch.json exists in the index at INDEX_COMMIT (check_dependencies)

# check_description_files.py: ACCEPTED_EXTENSION_CATEGORIES, REPOSITORY_NAME/EXTENSION_NAME exceptions not needed.
ACCEPTED_EXTENSION_CATEGORIES = [
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT",
    "Informatics", "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning",
    "Otolaryngology", "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy",
    "Registration", "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis",
    "Shape Regression", "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging",
    "Supervisely", "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography",
    "Training", "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools", "Wizards",
]  # fmt: skip
LICENSE_FILE_NAMES = ["LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt"]
ALLOWED_REPOSITORY_PREFIXES = ["Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_"]
# check_cmakelists_content's patterns, verbatim (IGNORECASE | MULTILINE as there).
PROJECT_PATTERN = r"project\s*\(\s*([^\s\)\n\r]+)"
ICON_URL_PATTERN = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOT_URLS_PATTERN = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
IMAGE_EXTENSIONS = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".gif": b"GIF8"}


def _metadata() -> dict:
    return json.loads(DESCRIPTION.read_text())  # parse_json


def _cmake_content() -> str:
    return (REPO / "CMakeLists.txt").read_text(encoding="utf-8", errors="ignore")


def _first(pattern: str) -> str | None:
    matches = re.findall(pattern, _cmake_content(), re.IGNORECASE | re.MULTILINE)
    return matches[0].strip() if matches else None


def _screenshot_urls() -> list[str]:
    urls = _first(SCREENSHOT_URLS_PATTERN)
    return [url.strip() for url in urls.split()] if urls else []


def _not_ignored(paths: list[Path]) -> list[Path]:
    """The paths git would commit: ``git check-ignore`` lists the ignored ones."""
    names = [str(p.relative_to(REPO)) for p in paths]
    result = subprocess.run(["git", "check-ignore", *names], cwd=REPO, capture_output=True, text=True)
    ignored = set(result.stdout.split())
    return [p for p, name in zip(paths, names, strict=True) if name not in ignored]


def _local_file_for(url: str) -> Path:
    """The repository file a raw.githubusercontent.com URL serves, asserting it is this repository on scm_revision."""
    metadata = _metadata()
    owner_repo = urlparse.urlsplit(metadata["scm_url"]).path.strip("/").removesuffix(".git")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{metadata['scm_revision']}/"
    assert url.startswith(prefix), f"{url} is not served from {prefix} (this repository at scm_revision)"
    return REPO / urlparse.unquote(url[len(prefix) :])


def _image_problem(url: str, what: str) -> str | None:
    """validate_image_url, offline: an http(s) URL with an image extension naming a committed image file."""
    if not url.startswith("http"):
        return f"{what} '{url}' should be a valid URL starting with 'http'"
    suffix = Path(urlparse.urlsplit(url).path).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:  # raw.githubusercontent.com answers octet-stream without an image extension
        return f"{what} '{url}' has no image file extension"
    path = _local_file_for(url)
    if not path.is_file():
        return f"{what} '{url}': {path.relative_to(REPO)} does not exist in the repository"
    if not _not_ignored([path]):
        return f"{what} '{url}': {path.relative_to(REPO)} is git-ignored, so it would never be committed"
    if not path.read_bytes().startswith(IMAGE_EXTENSIONS[suffix]):
        return f"{what} '{url}': {path.relative_to(REPO)} is not a {suffix} image"
    return None


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (which must come first)."""
    data = path.read_bytes()
    assert data[:8] == IMAGE_EXTENSIONS[".png"] and data[12:16] == b"IHDR", f"{path}: not a PNG"
    return struct.unpack(">II", data[16:24])


def _schema_errors(value, schema: dict, where: str = "") -> list[str]:  # noqa: ANN001
    """The subset of JSON Schema draft-07 the catalog schema uses: type, required, additionalProperties,
    properties, enum, items, minimum, maximum."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    kind = schema.get("type")
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where or '/'}: {value!r} is not of type 'integer'"]
    elif kind and not isinstance(value, types[kind]):
        return [f"{where or '/'}: {value!r} is not of type '{kind}'"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if ("minimum" in schema and value < schema["minimum"]) or ("maximum" in schema and value > schema["maximum"]):
        errors.append(f"{where}: {value!r} is outside [{schema.get('minimum')}, {schema.get('maximum')}]")
    if isinstance(value, dict):
        errors += [f"{where}: '{key}' is a required property" for key in schema.get("required", ()) if key not in value]
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            errors += [f"{where}: additional property '{key}' is not allowed" for key in value if key not in properties]
        for key, item in value.items():
            if key in properties:
                errors += _schema_errors(item, properties[key], f"{where}/{key}")
    if isinstance(value, list) and "items" in schema:
        for n, item in enumerate(value):
            errors += _schema_errors(item, schema["items"], f"{where}/{n}")
    return errors


def test_description_file_is_lf_only_json():
    """check_json_file_format."""
    content = DESCRIPTION.read_bytes()
    json.loads(content)
    assert b"\r" not in content, "MedVLSAM2.json contains CR or CRLF line endings; the index wants LF only"


def test_description_file_follows_the_catalog_schema():
    """check_json_schema, against the schema its ``$schema`` names (copied from the index, same ``$id``)."""
    metadata, schema = _metadata(), json.loads(SCHEMA_FILE.read_text())
    assert metadata.get("$schema"), "No $schema field found in extension description"
    assert metadata["$schema"].split("#")[0] == schema["$id"].split("#")[0], "the copied schema is not the named one"
    assert _schema_errors(metadata, schema) == []
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(metadata, schema)  # the index's own validator, where installed


def test_schema_subset_validator_rejects_what_the_schema_forbids():
    """The hand-written validator above is not vacuous: each kind of violation the schema states is caught."""
    schema = json.loads(SCHEMA_FILE.read_text())
    good = _metadata()
    for bad in [{k: v for k, v in good.items() if k != "scm_url"}, {**good, "homepage": "x"}, {**good, "tier": 7},
                {**good, "tier": "1"}, {**good, "scm_type": "svn"}, {**good, "build_dependencies": [3]},
                {**good, "enabled": 1}]:  # fmt: skip
        assert _schema_errors(bad, schema), bad


def test_extension_name_and_category_are_accepted():
    """check_extension_name and check_category."""
    assert not EXTENSION_NAME.lower().startswith("slicer"), "extension name *should not* start with 'Slicer'"
    category = _metadata().get("category")
    assert category in ACCEPTED_EXTENSION_CATEGORIES, f"Category {category} is unknown to the index"


def test_scm_url_and_repository_name():
    """check_scm_url_syntax and check_git_repository_name."""
    url = _metadata()["scm_url"]
    assert "://" in url and urlparse.urlsplit(url).scheme in ("git", "https"), url
    repo_name = os.path.splitext(urlparse.urlsplit(url.strip().strip("/")).path.split("/")[-1])[0]
    assert repo_name and any(repo_name.startswith(prefix) for prefix in ALLOWED_REPOSITORY_PREFIXES), repo_name
    assert urlparse.urlsplit(url).netloc.lower() == "github.com"  # so check_git_repository_topics applies (online)


def test_cmake_project_name_matches_the_description_file():
    """check_cmakelists_content: the first project() (else EXTENSION_NAME) equals the .json file's stem."""
    name = _first(PROJECT_PATTERN) or _first(r"set\(EXTENSION_NAME\s+([^\s\)]+)\)")
    assert name, "No project() declaration found in CMakeLists.txt"
    assert name.strip('"').strip("'") == EXTENSION_NAME


def test_cmake_icon_url_serves_a_committed_image():
    """check_cmakelists_content: EXTENSION_ICONURL found and validate_image_url (offline)."""
    url = _first(ICON_URL_PATTERN)
    assert url, "No EXTENSION_ICONURL found in CMakeLists.txt."
    assert _image_problem(url, "EXTENSION_ICONURL") is None, _image_problem(url, "EXTENSION_ICONURL")


def test_cmake_screenshot_urls_serve_committed_screenshots():
    """check_cmakelists_content: EXTENSION_SCREENSHOTURLS found (an empty string is "not found" to its pattern) and
    validate_image_url for each (offline); ours: at least two, real PNGs of a sensible size under 300 kB."""
    urls = _screenshot_urls()
    assert urls, "No EXTENSION_SCREENSHOTURLS found in CMakeLists.txt."
    assert len(urls) >= 2 and len(set(urls)) == len(urls), urls
    problems = [problem for url in urls if (problem := _image_problem(url, "EXTENSION_SCREENSHOTURLS"))]
    assert problems == []
    for url in urls:
        path = _local_file_for(url)
        width, height = _png_size(path)
        assert 400 <= width <= 2400 and 300 <= height <= 2400, f"{path.name}: {width}x{height}"
        assert path.stat().st_size <= MAX_SCREENSHOT_BYTES, f"{path.name}: {path.stat().st_size} bytes"


def test_screenshots_are_the_ones_the_script_makes():
    """Every screenshot URL names a file that Screenshots/make_screenshots.py writes, and it writes no others."""
    assert SCREENSHOT_SCRIPT.is_file()
    spec = importlib.util.spec_from_file_location("make_screenshots", SCREENSHOT_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # cheap: Qt, matplotlib and torch are imported inside its functions
    made = [SCREENSHOT_SCRIPT.parent / name for name in script.OUTPUTS]
    assert [_local_file_for(url) for url in _screenshot_urls()] == made
    assert script.MAX_BYTES <= MAX_SCREENSHOT_BYTES


def test_repository_size_is_under_the_index_limit():
    """check_repository_size, on the files a clone would hold (tracked or not ignored), not on the build outputs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    total = sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())
    assert total / (1024 * 1024) <= REPOSITORY_SIZE_LIMIT_MB, f"{total / 1e6:.1f} MB"


def test_license_file_in_the_repository_root():
    """check_license_file."""
    assert any((REPO / name).is_file() for name in LICENSE_FILE_NAMES), "No license file found in repository root."


def test_build_dependencies_are_extensions_of_the_index():
    """check_dependencies: every build dependency is another extension in the index."""
    assert set(_metadata().get("build_dependencies", [])) <= INDEX_EXTENSIONS_WE_DEPEND_ON


@pytest.mark.parametrize("field", ["scm_url", "category"])
def test_required_metadata_keys_have_values(field: str):
    """require_metadata_key, as the index's decorators apply it."""
    assert _metadata().get(field) is not None, f"{field} value is not set"
