"""Ray Serve for Muse: one deployment per model (text encoder, base, super-res, VQGAN decoder) chained
under a FastAPI ingress that speaks OpenAI's Images API. Entry points: `serve.app:build_app`,
`serve/config.yaml`, and `muse serve` (serve.cli)."""
