"""recsys: LLM-based cross-domain sequential recommendation (per-domain LoRA, X-Cross, WeaveRec)."""

__version__ = "0.1.0"
