"""The install is reproducible: constraints.txt pins every dependency pyproject.toml names, each
pin satisfies its declared range, and the environment the tests run in is the pinned one."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
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


def _llama_cpu_flags() -> str:
    match = re.search(r"^LLAMA_CPU_FLAGS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile: LLAMA_CPU_FLAGS is not set"
    return match.group(1).strip()


def test_the_llama_cpp_build_flags_drop_amx_but_keep_avx512_vnni():
    """On an AMX CPU, -march=native plus the Makefile's flags leaves llama.cpp's AMX kernels
    out (they compile only under __AMX_INT8__) and its AVX512-VNNI ones in; the README's
    hand-install command carries the same flags."""
    flags = _llama_cpu_flags()
    readme = (ROOT / "README.md").read_text()
    assert f"-DCMAKE_C_FLAGS='{flags}'" in readme and f"-DCMAKE_CXX_FLAGS='{flags}'" in readme
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to preprocess with")
    macros = subprocess.run(["gcc", *flags.split(), "-march=sapphirerapids", "-dM", "-E", "-"], input="",
                            capture_output=True, text=True, check=True).stdout
    assert "__AVX512VNNI__" in macros
    assert not [m for m in ("__AMX_TILE__", "__AMX_INT8__", "__AMX_BF16__") if m in macros]
