"""pyproject.toml and environment.yml list the same dependencies, with bounds our pinned torch meets."""

import tomllib
import yaml
from packaging.requirements import Requirement

from lessons_lib.config import REPO_ROOT


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    parsed = [Requirement(r) for r in reqs]
    return {r.name.lower().replace("-", "_"): str(r.specifier) for r in parsed if r.name != "lessons_lib"}


def _environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    parsed = [Requirement(r) for r in pip if not r.startswith("-e")]
    assert "-e ." in pip, "environment.yml must install the course library itself (-e .)"
    return {r.name.lower().replace("-", "_"): str(r.specifier) for r in parsed}


def test_environment_yml_matches_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_pinned_torch_satisfies_the_bounds():
    reqs = _pyproject_requirements()
    from packaging.specifiers import SpecifierSet

    assert "2.14.1" in SpecifierSet(reqs["torch"]) and "0.29.1" in SpecifierSet(reqs["torchvision"])
    assert all(not spec.startswith("==") for spec in reqs.values()), "use lower bounds, not pins"


def test_python_version_agrees():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    from packaging.specifiers import SpecifierSet

    assert python.split("=")[1] + ".0" in SpecifierSet(project["requires-python"])
