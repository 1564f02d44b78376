"""Data for the trainer layer: the embedded default datasets, tokenizers and packed multimodal samples."""
