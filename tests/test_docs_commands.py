"""Every ``train.py``/``evaluate.py`` command in README.md and docs/*.md composes with the real configs
(Hydra, nothing runs): a renamed key, group or option fails here, not in a reader's terminal. A sweep
(``a=x,y``) composes with its first value; ``<placeholders>`` stand for a name of the reader's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import CONF, REPO, compose_config

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
APPS = {"train.py": "train", "recsys-train": "train", "evaluate.py": "eval", "recsys-evaluate": "eval"}


def commands(page: Path) -> list[str]:
    """The train/evaluate command lines of ``page``'s bash blocks and inline code, comments and
    continuations resolved."""
    text = page.read_text()
    found = []
    for block in re.findall(r"```(?:bash|console)?\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            found += [part.strip() for part in line.split("&&")]
    found += [" ".join(c.split()) for c in
              re.findall(r"`((?:python (?:train|evaluate)\.py|recsys-(?:train|evaluate))(?: [^`]*)?)`", text)]
    out = []
    for c in found:
        c = re.sub(r"(^|\s)#.*$", "", c).strip()  # a trailing comment
        words = c.split()
        if any(w in APPS for w in words[:2]) and "[" not in c.split("#")[0].replace("'data.sources=[", "") \
                .replace("'hydra.launcher.setup=[", "").replace("'experiment=[", ""):
            out.append(c)
    return out


def overrides(command: str) -> tuple[str, list[str]]:
    """(config name, overrides) of a command line; a sweep takes its first value, ``<a|b>`` its first
    option; a config group's ``<placeholder>`` is left out."""
    command = re.sub(r"<([^>|]*)\|[^>]*>", r"\1", command)
    command = re.sub(r"(^|\s)([\w/]+)=<[^>]*>", lambda m: m.group(1) if (CONF / m.group(2)).is_dir() else
                     f"{m.group(1)}{m.group(2)}=x", command)
    command = re.sub(r"<[^>]*>", "x", command)
    words = shlex.split(command)
    at = next(i for i, w in enumerate(words) if w in APPS)
    args = [w for w in words[at + 1:] if w not in ("-m", "--multirun")]
    out = []
    for o in OverridesParser.create().parse_overrides(args):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return APPS[words[at]], out


CASES = [(page.relative_to(REPO).as_posix(), c) for page in PAGES for c in commands(page)]


def test_the_readme_and_docs_have_commands():
    pages = {p for p, _ in CASES}
    assert "README.md" in pages and "docs/usage.md" in pages and "docs/methods.md" in pages
    assert sum(p == "README.md" for p, _ in CASES) >= 20


@pytest.mark.parametrize("page,command", CASES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(CASES)])
def test_command_composes(page, command, tmp_path, monkeypatch):
    monkeypatch.delenv("RECSYS_CONFIG_DIR", raising=False)
    name, args = overrides(command)
    if "RECSYS_CONFIG_DIR=" in command:  # a folder of the reader's own configs: the packaged part composes
        args = [a for a in args if not a.startswith("backbone=")]
    cfg = compose_config(name, *args, hydra_cfg=True)
    assert cfg.get("task_name") or name == "eval", command
