"""qwen_jax: the Qwen v1 language models in JAX/Flax, exact to the released PyTorch models."""

from qwen_jax.parallel.devices import skip_absent_tpu

skip_absent_tpu()  # before any backend starts: no libtpu start-up noise on hosts without TPU

from qwen_jax.io.checkpoint import CheckpointError, load_params, save_checkpoint
from qwen_jax.model.attention import attention
from qwen_jax.model.config import PRESETS, ConfigError, QwenConfig, preset
from qwen_jax.model.kv_cache import KVCache, cache_bytes, init_cache
from qwen_jax.model.long_context import dynamic_ntk_alpha, logn_scale
from qwen_jax.model.transformer import Qwen, init_params, param_logical_axes, param_shardings
from qwen_jax.parallel.sharding import make_mesh

__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "KVCache", "Qwen", "QwenConfig", "attention",
    "cache_bytes", "dynamic_ntk_alpha", "init_cache", "init_params", "load_params", "logn_scale",
    "make_mesh", "param_logical_axes", "param_shardings", "preset", "save_checkpoint",
]
