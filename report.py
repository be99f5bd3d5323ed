"""Results tables and plots from sweep folders (``python -m recsys.evaluation.tables``), and the results
page of the committed results archive (``recsys.evaluation.studies``).

    python report.py multirun/train/2026-01-01_10-00-00 --out reports/main
    python report.py results --page docs/results.md
"""

from recsys.evaluation.studies import report_main

if __name__ == "__main__":
    report_main()
