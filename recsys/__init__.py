"""recsys: LLM-based cross-domain sequential recommendation (per-domain LoRA, X-Cross, WeaveRec)."""

from pathlib import Path

__version__ = "0.1.0"


def _config_dir() -> Path:
    """The Hydra configs: ``recsys/conf`` inside an installed wheel, ``conf/`` at the top of a checkout
    (pyproject.toml maps the one onto the other)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if (packaged / "train.yaml").is_file() else here.parent / "conf"


CONFIG_DIR = _config_dir()
