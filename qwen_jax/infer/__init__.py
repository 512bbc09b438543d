"""Using a model: sampling, batched generation with a KV cache, ChatML chat and perplexity
evaluation (the CLIs behind `python -m qwen_jax.generate|chat|eval_ppl`)."""
