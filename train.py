"""Train one method on one target domain; writes metrics.json and prints the results table.

    python train.py                                   # LoRA on a synthetic domain, offline, CPU
    python train.py method=lora backbone=minilm data=amazon data.target=beauty seed=1
    python train.py -m seed=0,1,2                      # a sweep
"""

import hydra
from omegaconf import DictConfig

from recsys.run import guarded, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metric, _ = guarded(train, cfg)
    return metric


if __name__ == "__main__":
    main()
