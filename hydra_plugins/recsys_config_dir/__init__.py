"""A Hydra search-path plugin: ``RECSYS_CONFIG_DIR=<folder>`` puts a folder of your own configs in
front of the packaged ones (recsys/conf), so it can add options to any group (``<folder>/backbone/mine.yaml``
is ``backbone=mine``) and override packaged ones of the same name (``<folder>/data/amazon.yaml``, even
``train.yaml``). Hydra finds plugins in the ``hydra_plugins`` namespace package; this one ships in the
wheel beside ``recsys``. (``--config-dir <folder>`` only adds: packaged options of the same name win.)"""

import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ENV = "RECSYS_CONFIG_DIR"


class RecsysConfigDir(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        folder = os.environ.get(ENV)
        if folder:
            search_path.prepend(provider="recsys-user", path=f"file://{os.path.abspath(os.path.expanduser(folder))}")
