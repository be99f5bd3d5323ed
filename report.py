"""Results tables and plots from sweep folders (the same as ``python -m recsys.evaluation.tables``).

    python report.py multirun/train/2026-01-01_10-00-00 --out reports/main
"""

from recsys.evaluation.tables import main

if __name__ == "__main__":
    main()
