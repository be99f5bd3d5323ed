"""Dependencies: ranges in pyproject.toml (users install the package into their own environments), one
tested set in requirements.lock that requirements.txt (and so .ci/run) and the Dockerfile install as
constraints; a true ``requires-python``."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def locked() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "+" not in version, f"requirements.lock: {line!r} is not name==version"
            out[canonicalize_name(name)] = version
    return out


def declared() -> list[Requirement]:
    return [Requirement(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]]


def test_pyproject_declares_ranges_that_the_lock_satisfies():
    lock = locked()
    for req in declared():
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: a range, not a pin"
        assert req.specifier, f"{req}: give the tested minor as a lower bound"
        assert canonicalize_name(req.name) in lock, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(lock[canonicalize_name(req.name)]), (str(req), lock[canonicalize_name(req.name)])


def test_torch_is_locked_exactly():
    assert locked()["torch"] == "2.13.0"  # unpinned, pip pulls a multi-GB CUDA build of another version


def test_ci_and_the_image_install_the_lock():
    reqs = (REPO / "requirements.txt").read_text().splitlines()
    assert "-c requirements.lock" in reqs and "-e .[test]" in reqs
    assert "pip install -q -r requirements.txt" in (REPO / ".ci" / "run").read_text()
    assert re.search(r"pip install --no-cache-dir -c requirements\.lock \.$", (REPO / "Dockerfile").read_text(), re.M)


def test_requires_python_is_what_the_dependencies_need():
    assert SpecifierSet(PROJECT["requires-python"]) == SpecifierSet(">=3.11")  # numpy 2.4, pandas 3, scipy 1.17
