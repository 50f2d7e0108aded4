"""The base model: any Stable Diffusion pipeline, or the built-in `tiny` one pretrained here."""
