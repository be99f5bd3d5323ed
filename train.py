"""Train one method on one target domain; writes metrics.json and prints the results table.
The same as the installed ``recsys-train`` (recsys/cli.py); configs in conf/.

    python train.py                                   # LoRA on a synthetic domain, offline, CPU
    python train.py method=lora backbone=minilm data=amazon data.target=beauty seed=1
    python train.py -m seed=0,1,2                      # a sweep
"""

from recsys.cli import train

if __name__ == "__main__":
    train()
