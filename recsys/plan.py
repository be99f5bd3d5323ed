"""A plan before the job: ``python -m recsys.plan <any train.py overrides>`` composes the run as train.py would,
builds the backbone on the meta device from its shipped shape (no weights, no network) and prints, per GPU, the
frozen and trainable weights, gradients, optimizer state, activations (with and without checkpointing), the total
against the device memory, and the steps, tokens, FLOPs and time of an epoch (recsys/pipeline/plan.py).

    python -m recsys.plan experiment=weaverec_paper trainer=fsdp
    python -m recsys.plan experiment=xcross_paper +plan.device_gb=141 +plan.tflops=400
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir

    from recsys import CONFIG_DIR
    from recsys.core.errors import UserError
    from recsys.pipeline.plan import check_sharded, format_plan, plan_config

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[a for a in args if a not in ("-m", "--multirun")],
                          return_hydra_config=True)
        check_sharded(cfg)
        shape, st, est = plan_config(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(cfg, shape, st, est))
    return 0 if est["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
