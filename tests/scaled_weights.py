"""Random parameters at O(1) scale for comparisons against other implementations.

init_params draws with std 0.02, which leaves activations, logits and rewards near zero, so
a wrong mapping, shift, mask or pooling position could hide inside a tolerance. These draw
RMSNorm weights around 1, biases of std 0.5, unit-variance embeddings and kernels scaled by
their fan-in (unit-variance activations, logits of std ~1)."""

import jax
import numpy as np

from qwen_jax.model.transformer import init_params


def scaled_params(config, seed=0):
    params = init_params(config, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        names = [p.key for p in path]
        if names[-1] == "weight":  # RMSNorm
            return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
        if names[-1] == "bias":
            return (0.5 * rng.standard_normal(x.shape)).astype(np.float32)
        if names[-1] == "embedding":
            return rng.standard_normal(x.shape).astype(np.float32)
        # kernels [(L,) in..., out...]: the fan-in is H (also o's N x D), except down's F
        fan_in = {"down": config.mlp_width}.get(names[-2], config.hidden_size)
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, params)
