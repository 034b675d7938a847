"""Muse: text-to-image generation with masked generative transformers over VQGAN tokens.

Pure PyTorch, single device; the Ray layers live in `pipelines/`, `jobs/` and `serve/`."""

__version__ = "0.1.0"
