"""Evaluation: the engine (batched scoring and generation on the mesh), the lm-evaluation-
harness backend `qwen_jax`, and the release's own protocols (`python -m qwen_jax.evaluate`)."""
