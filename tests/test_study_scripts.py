"""The study scripts (``scripts/study_*.sh``) run as written: each is run in a copy of ``scripts/`` with a
``python`` on PATH that records its arguments (a ``train.py`` call writes nothing; an archive call writes the
``metrics.json`` the scripts test for), and every ``train.py`` command they issue composes with the real configs.
So a renamed key or preset fails here, not after an hour of a study; and a script resumes (an archived run is
not trained again)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, compose_config
from test_docs_commands import overrides

SHIM = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$STUDY_CALLS"
if [ "$1" = -m ] && [ "$2" = recsys.evaluation.studies ]; then mkdir -p "$4" && echo '{}' > "$4/metrics.json"; fi
"""


def run_script(tmp_path: Path, *args: str) -> list[str]:
    """The python calls of ``scripts/<args>`` run in a copy of the project's scripts under ``tmp_path``."""
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(SHIM)
    (bin_dir / "python").chmod(stat.S_IRWXU)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUDY_CALLS=str(calls))
    subprocess.run(["bash", str(tmp_path / "scripts" / args[0]), *args[1:]], check=True, env=env, cwd=tmp_path)
    return calls.read_text().splitlines() if calls.exists() else []


def train_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("train.py ")]


def composes(call: str) -> None:
    name, args = overrides("python " + call)
    compose_config(name, *args)


@pytest.mark.parametrize("script, runs", [
    (("study_xcross.sh", "games", "toys", "beauty", "0"), 3 + 1),  # three LoRAs, X-Cross
    # games' LoRA and X-Cross archived (below): the sources' LoRAs, WeaveRec, two joint rows, four merges
    (("study_weaverec.sh", "games", "beauty", "toys", "0"), 2 + 1 + 2 + 4),
    (("study_efficiency.sh", "games", "toys", "beauty", "0"), 2 + 3 * 2),  # the sources' LoRAs, 3 fractions x 2
    (("study_sasrec.sh", "beauty", "games"), 2 * 2),  # two domains, each trained on prefixes and on sequences
])
def test_study_script_commands_compose(tmp_path, script, runs):
    if script[0] != "study_xcross.sh":  # the scripts that reuse the X-Cross study's archived 100% / LoRA rows
        for name in ("lora-games-s0", "xcross-games-s0"):
            (tmp_path / "results" / "xcross" / name).mkdir(parents=True)
            (tmp_path / "results" / "xcross" / name / "metrics.json").write_text("{}")
    calls = train_calls(run_script(tmp_path, *script))
    assert len(calls) == runs, calls
    for call in calls:
        composes(call)
    assert all(c.split("hydra.run.dir=")[1].startswith("outputs/study/") for c in calls)


def test_study_scripts_resume(tmp_path):
    """A second run of a finished study trains nothing: every run is archived."""
    first = train_calls(run_script(tmp_path, "study_weaverec.sh", "games", "beauty", "toys", "0"))
    calls = tmp_path / "calls.txt"
    calls.unlink()
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", STUDY_CALLS=str(calls))
    subprocess.run(["bash", str(tmp_path / "scripts" / "study_weaverec.sh"), "games", "beauty", "toys", "0"],
                   check=True, env=env, cwd=tmp_path)
    assert first and not (calls.exists() and train_calls(calls.read_text().splitlines()))
    copied = json.loads((tmp_path / "results" / "weaverec" / "lora-games-s0" / "metrics.json").read_text())
    assert copied == {}  # the target-only row is the X-Cross study's archived LoRA run, copied
