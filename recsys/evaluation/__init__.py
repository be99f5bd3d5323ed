"""What happens to rankings after a model made them: per-user rank files (``ranks``), full-catalogue
ranking (``catalogue``), paired significance tests (``significance``) and the results tables and plots
of run and sweep folders (``tables``, the ``report.py`` command)."""
