"""The Qwen v1 decoder: config, layers (RMSNorm, rotary, SwiGLU), attention, long-context
inference (dynamic NTK, LogN, windows), the KV cache and the model. Imports only
`qwen_jax.parallel` (logical-axis rules, the target platform) and `qwen_jax.kernels`."""
