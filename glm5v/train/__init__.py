"""Training loops of the recipe: CogViT stage 1 (mim) and stage 2 (contrastive), SFT; shared pieces in loop.py."""
