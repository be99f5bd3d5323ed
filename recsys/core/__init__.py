"""Foundations every layer may use: the user error and typed-settings check (``errors``), atomic files
(``files``), progress bars (``progress``), ranking metrics and the metric names (``metrics``)."""
