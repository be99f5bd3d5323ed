"""Score a trained model on a domain's validation or test split with the same fixed candidates.
The same as the installed ``recsys-evaluate`` (recsys/cli.py).

    python evaluate.py run_dir=outputs/train/<date>          # the run's config and best checkpoint
    python evaluate.py adapter=artifacts/adapters/synthetic/embedded-minilm-l6/tools data.target=tools
    python evaluate.py run_dir=... split=val
"""

from recsys.cli import evaluate

if __name__ == "__main__":
    evaluate()
