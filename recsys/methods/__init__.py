"""Methods: one LightningModule a file (lora, xcross, weaverec, joint, merge_sources)."""
