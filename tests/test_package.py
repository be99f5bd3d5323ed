"""The installable package: the wheel holds the configs, the Hydra plugin and the console scripts;
installed into a fresh virtual environment outside the checkout, ``recsys-train`` runs the embedded
default from another folder, on the packaged configs, and a folder of your own configs
(``RECSYS_CONFIG_DIR``) adds and overrides options.

The slow test does not download: the fresh environment sees this environment's packages through a
``.pth`` line (appended to its path, after its own site-packages), so ``pip install --no-index`` of the
wheel resolves the declared dependencies against them and installs ``recsys`` itself into the new
environment. CI's ``pip install -e .[test]`` in a fresh venv is the install from the package index.
"""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def build_wheel(out: Path) -> Path:
    """A wheel built from a copy of the checkout's files (the build writes nothing into the checkout)."""
    import shutil

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    src = out / "src"
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(out / "dist")], check=True, capture_output=True, text=True)
    (wheel,) = (out / "dist").glob("recsys-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {n.removeprefix("recsys/conf/") for n in names if n.startswith("recsys/conf/")}
    in_checkout = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*")
                   if p.is_file() and p.suffix in (".yaml", ".example", ".py", ".json") and not p.match("local/*.yaml")}
    assert in_checkout <= packaged, in_checkout - packaged  # every config ships
    assert "hydra_plugins/recsys_config_dir/__init__.py" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("recsys-train", "recsys-evaluate", "recsys-report", "recsys-download"):
        assert f"{script} = " in meta
    requires = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in declared:  # the ranges pyproject.toml declares (the tested set is requirements.lock)
        name = dep.split(">")[0].split("<")[0].split("=")[0]
        assert f"Requires-Dist: {name}" in requires, dep


@pytest.mark.slow
def test_installed_commands_run_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_this_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", str(wheel)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RECSYS_CONFIG_DIR")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")

    def cmd(*args, extra_env=None):
        p = subprocess.run([str(a) for a in args], cwd=elsewhere, capture_output=True, text=True, timeout=600,
                           env={**env, **(extra_env or {})})
        assert p.returncode == 0, f"{args}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p.stdout

    where = cmd(py, "-c", "import recsys, hydra_plugins.recsys_config_dir as h; print(recsys.__file__, h.__file__)")
    assert where.startswith(site) and str(REPO) not in where  # the installed copy, not the checkout
    # the embedded default (MiniLM, synthetic tools), shortened
    # export_adapter=force: two batches leave the loss at chance, and such a run is stored only when forced
    cmd(venv / "bin" / "recsys-train", "trainer.limit_train_batches=2", "data.max_eval_users=8", "zero_shot=false",
        "export_adapter=force", "hydra.run.dir=run")
    metrics = json.loads((elsewhere / "run" / "metrics.json").read_text())
    assert metrics["data/test_examples"] == 8 and 0 <= metrics["test/ndcg@10"] <= 1
    import yaml

    sources = yaml.safe_load((elsewhere / "run" / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["config_sources"]
    main = next(s for s in sources if s["provider"] == "main")
    assert main["schema"] == "file" and main["path"].startswith(site) and main["path"].endswith("recsys/conf")  # the packaged configs
    assert (elsewhere / "artifacts" / "adapters" / "synthetic" / "embedded-minilm-l6" / "tools" / "seed-0" / "manifest.json").is_file()
    cmd(venv / "bin" / "recsys-evaluate", "run_dir=run", "hydra.run.dir=eval")
    assert json.loads((elsewhere / "eval" / "metrics.json").read_text())["test/ndcg@10"] == pytest.approx(
        metrics["test/ndcg@10"], abs=1e-6)
    cmd(venv / "bin" / "recsys-report", "run", "--out", "report", "--wandb", "off")
    assert (elsewhere / "report" / "report.md").is_file()
    assert "--category" in cmd(venv / "bin" / "recsys-download", "--help")
    # a folder of your own configs: a new backbone option, and a packaged option overridden
    mine = tmp_path / "mine"
    (mine / "backbone").mkdir(parents=True)
    (mine / "backbone" / "mine.yaml").write_text("name: tiny:encoder   # my backbone\ndtype: float32\n")
    (mine / "data").mkdir()
    (mine / "data" / "synthetic.yaml").write_text(
        "defaults:\n  - common\n  - _self_\nroot: null\ncollection: mine\n"
        "domains:\n  garden: {source: synthetic, kind: sports, num_users: 60, num_items: 50, seed: 0}\ntarget: garden\nmax_eval_users: 5\n")
    cmd(venv / "bin" / "recsys-train", "backbone=mine", "trainer.limit_train_batches=2", "zero_shot=false",
        "export_adapter=force", "hydra.run.dir=mine", extra_env={"RECSYS_CONFIG_DIR": str(mine)})
    m = json.loads((elsewhere / "mine" / "metrics.json").read_text())
    assert m["data/test_examples"] == 5
    assert (elsewhere / "artifacts" / "adapters" / "mine" / "tiny-encoder" / "garden" / "seed-0" / "manifest.json").is_file()
