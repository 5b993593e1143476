"""The install is reproducible: constraints.txt pins every dependency pyproject.toml names, each
pin satisfies its declared range, and the environment the tests run in is the pinned one."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: '{line}' is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("tandem[")]
    return reqs


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = _pins()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in constraints.txt (run `make lock`)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's '{req.specifier}' (run `make lock`)"
        )


def test_the_installed_environment_is_the_pinned_one():
    pins = _pins()
    wrong = []
    for req in _declared():
        name = canonicalize_name(req.name)
        try:
            installed = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            continue  # an optional extra this environment did not install
        if installed.public != pins[name].public:
            wrong.append(f"{req.name} {installed} (pinned {pins[name]})")
    assert not wrong, "installed versions differ from constraints.txt (reinstall with `make install`): " + ", ".join(wrong)
