"""Score a trained model on a domain's validation or test split with the same fixed candidates.

    python evaluate.py run_dir=outputs/train/<date>          # the run's config and best checkpoint
    python evaluate.py adapter=artifacts/adapters/synthetic/embedded-minilm-l6/tools data.target=tools
    python evaluate.py run_dir=... split=val
"""

import hydra
from omegaconf import DictConfig

from recsys.run import evaluate, guarded


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    metric, _ = guarded(evaluate, cfg)
    return metric


if __name__ == "__main__":
    main()
