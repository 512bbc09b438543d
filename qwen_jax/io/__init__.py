"""Weights in and out: parameter checkpoints (Orbax), Hugging Face conversion (safetensors,
the original Qwen v1 layout) and the PyTorch reference used for logit checks."""
