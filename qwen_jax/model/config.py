"""Model configuration: the released Qwen v1 `config.json` fields plus qwen_jax's own.

The field names follow the released `config.json` so that `from_hf` / `to_hf` are a plain
rename-free mapping. Note the Qwen quirk: `intermediate_size` is twice the MLP width (the two
SwiGLU branches `w1` and `w2` each have `intermediate_size // 2` outputs).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

ATTENTION_IMPLS = ("xla", "pallas", "auto")
REMAT_POLICIES = ("none", "minimal", "save_dot_except_mlp", "full")
DTYPES = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("default", "high", "highest")
LORA_TARGETS = ("c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "w1", "w2")
BASE_QUANTS = ("none", "int8", "int4", "nf4")

# Keys of the released config.json that carry model facts. Anything else in a Qwen config.json
# (auto_map, flash/kernel switches, fp16/bf16 flags...) is runtime plumbing of the PyTorch code.
_HF_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "kv_channels",
    "seq_length",
    "rotary_emb_base",
    "rotary_pct",
    "layer_norm_epsilon",
    "vocab_size",
    "use_dynamic_ntk",
    "use_logn_attn",
    "max_position_embeddings",
    "emb_dropout_prob",
    "attn_dropout_prob",
    "initializer_range",
)
_REQUIRED_HF_FIELDS = _HF_FIELDS[:6] + ("vocab_size",)
_OURS_KEY = "qwen_jax"


class ConfigError(ValueError):
    """A configuration a user wrote or loaded is invalid."""


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    # --- fields of the released config.json ---
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_hidden_layers: int = 32
    intermediate_size: int = 22016  # 2 x MLP width, as in the release
    kv_channels: int = 128
    seq_length: int = 8192  # trained context S: NTK and LogN are relative to it
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    layer_norm_epsilon: float = 1e-6
    vocab_size: int = 151936
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    max_position_embeddings: int = 32768
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    # --- qwen_jax's own ---
    # Per-layer attention window (report §2.5 layer-wise window attention), 0 = full attention.
    # Applied at inference only, like NTK and LogN. None = no windows.
    window_sizes: tuple[int, ...] | None = None
    dtype: str = "bfloat16"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"
    matmul_precision: str = "default"
    attention_impl: str = "auto"  # see attention.resolve_impl
    remat_policy: str = "none"
    # True: one stacked parameter set (`params["layers"]`, leading layer axis) run by nn.scan;
    # the layout of training, checkpoints and conversion. False: one subtree per layer
    # (`params["layers_0"]`...), an unrolled stack; what decoding on CPU uses (see
    # model.unstack_layers).
    scan_layers: bool = True
    # LoRA (qwen_jax.model.lora): rank 0 = none. Targets by the release's module names:
    # "c_attn" (q, k, v: one adapter on the fused projection), "attn.c_proj", "mlp.c_proj",
    # "c_proj" (both), "w1", "w2".
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("c_attn", "c_proj", "w1", "w2")
    lora_rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    # The frozen layer projections stored quantised (Q-LoRA): "none", "int8", "int4", "nf4";
    # int4 / nf4 with one scale per `base_quant_group` inputs of each output.
    base_quant: str = "none"
    base_quant_group: int = 64

    def __post_init__(self):
        if self.window_sizes is not None and not isinstance(self.window_sizes, tuple):
            object.__setattr__(self, "window_sizes", tuple(int(w) for w in self.window_sizes))
        if not isinstance(self.lora_targets, tuple):
            object.__setattr__(self, "lora_targets", tuple(str(t) for t in self.lora_targets))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    def layer_windows(self) -> tuple[int, ...]:
        if self.window_sizes is None:
            return (0,) * self.num_hidden_layers
        return self.window_sizes

    def replace(self, **changes) -> "QwenConfig":
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(key, value, expected):
            raise ConfigError(f"invalid Qwen config: {key}={value!r}; expected {expected}")

        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                    "kv_channels", "seq_length", "vocab_size", "max_position_embeddings"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(key, value, "a positive integer")
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            fail("num_attention_heads x kv_channels",
                 f"{self.num_attention_heads} x {self.kv_channels}",
                 f"to equal hidden_size={self.hidden_size}")
        if self.intermediate_size % 2:
            fail("intermediate_size", self.intermediate_size,
                 "an even number (twice the MLP width of w1/w2)")
        if not 0.0 < self.rotary_pct <= 1.0:
            fail("rotary_pct", self.rotary_pct, "a fraction in (0, 1]")
        if self.rotary_dim % 2 or self.rotary_dim < 2:
            fail("rotary_pct", self.rotary_pct,
                 f"a rotary dimension (kv_channels x rotary_pct = {self.rotary_dim}) that is even")
        if not self.rotary_emb_base > 0:
            fail("rotary_emb_base", self.rotary_emb_base, "a positive number")
        if not self.layer_norm_epsilon > 0:
            fail("layer_norm_epsilon", self.layer_norm_epsilon, "a positive number")
        for key in ("emb_dropout_prob", "attn_dropout_prob"):
            if not 0.0 <= getattr(self, key) < 1.0:
                fail(key, getattr(self, key), "a probability in [0, 1)")
        if self.window_sizes is not None:
            if len(self.window_sizes) != self.num_hidden_layers:
                fail("window_sizes", self.window_sizes,
                     f"one entry per layer ({self.num_hidden_layers})")
            if any(w < 0 for w in self.window_sizes):
                fail("window_sizes", self.window_sizes, "entries >= 0 (0 = full attention)")
        if self.dtype not in DTYPES:
            fail("dtype", self.dtype, f"one of {DTYPES}")
        if self.param_dtype not in DTYPES:
            fail("param_dtype", self.param_dtype, f"one of {DTYPES}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            fail("matmul_precision", self.matmul_precision, f"one of {MATMUL_PRECISIONS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", self.attention_impl, f"one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", self.remat_policy, f"one of {REMAT_POLICIES}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or \
                self.lora_rank < 0:
            fail("lora_rank", self.lora_rank, "an integer >= 0 (0 = no LoRA)")
        if self.lora_rank:
            if not self.lora_alpha > 0:
                fail("lora_alpha", self.lora_alpha, "a positive number")
            if not 0.0 <= self.lora_dropout < 1.0:
                fail("lora_dropout", self.lora_dropout, "a probability in [0, 1)")
            unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
            if unknown or not self.lora_targets:
                fail("lora_targets", self.lora_targets,
                     f"a non-empty subset of {LORA_TARGETS}")
        if self.base_quant not in BASE_QUANTS:
            fail("base_quant", self.base_quant, f"one of {BASE_QUANTS}")
        if self.base_quant != "none" and not self.lora_rank:
            fail("base_quant", self.base_quant, "'none' without LoRA (lora_rank > 0): a "
                 "quantised base is frozen")
        if self.base_quant in ("int4", "nf4"):
            g = self.base_quant_group
            inputs = {"hidden_size": self.hidden_size, "kv_channels": self.kv_channels,
                      "mlp width": self.mlp_width}
            bad = [f"{k}={v}" for k, v in inputs.items() if v % g]
            if g < 1 or bad:
                fail("base_quant_group", g, "a group size dividing every projection's input "
                     f"dimension ({', '.join(bad) or 'positive'})")

    # ------------------------------------------------------------ sizes
    def num_params(self) -> int:
        """Exact parameter count: untied embeddings, QKV bias, no other bias."""
        h, f, v = self.hidden_size, self.mlp_width, self.vocab_size
        per_layer = (3 * h * h + 3 * h) + h * h + 3 * h * f + 2 * h
        return 2 * v * h + self.num_hidden_layers * per_layer + h

    # ------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides) -> "QwenConfig":
        """From a released `config.json` (path, directory holding one, or parsed dict)."""
        where = "config"
        if isinstance(source, Mapping):
            data = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            try:
                with open(path) as f:
                    data = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such config file") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        model_type = data.get("model_type", "qwen")
        if model_type != "qwen":
            raise ConfigError(f"{where}: model_type={model_type!r} is not supported; "
                              "expected 'qwen' (Qwen v1)")
        missing = [k for k in _REQUIRED_HF_FIELDS if k not in data]
        if missing:
            raise ConfigError(f"{where}: missing key(s) {missing} of a Qwen v1 config.json")
        kwargs: dict[str, Any] = {}
        for key in _HF_FIELDS:
            if key in data and data[key] is not None:
                kwargs[key] = data[key]
        if data.get("no_bias") is False:
            raise ConfigError(f"{where}: no_bias=False is not Qwen v1 (only c_attn has a bias)")
        if data.get("tie_word_embeddings"):
            raise ConfigError(f"{where}: tie_word_embeddings=True is not Qwen v1 (untied lm_head)")
        ours = data.get(_OURS_KEY, {})
        unknown = set(ours) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} under '{_OURS_KEY}'")
        kwargs.update(ours)
        kwargs.update(overrides)
        for key in ("rotary_emb_base", "rotary_pct", "layer_norm_epsilon"):
            if key in kwargs and isinstance(kwargs[key], int):
                kwargs[key] = float(kwargs[key])
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self, include_ours: bool = False) -> dict[str, Any]:
        """A `config.json` that the original PyTorch code loads."""
        out: dict[str, Any] = {
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {
                "AutoConfig": "configuration_qwen.QWenConfig",
                "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
            },
            "model_type": "qwen",
            "bf16": self.param_dtype == "bfloat16",
            "fp16": self.param_dtype == "float16",
            "fp32": self.param_dtype == "float32",
            "no_bias": True,
            "scale_attn_weights": True,
            "tie_word_embeddings": False,
            "use_cache": True,
            "use_flash_attn": "auto",
            "tokenizer_class": "QWenTokenizer",
        }
        for key in _HF_FIELDS:
            out[key] = getattr(self, key)
        if include_ours:
            hf = set(_HF_FIELDS)
            out[_OURS_KEY] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                              if f.name not in hf}
        return dict(sorted(out.items()))

    def to_json(self) -> str:
        return json.dumps(self.to_hf(include_ours=True), indent=2)


# The released configs (../shared/reference/hf-configs/), as presets.
PRESETS: dict[str, QwenConfig] = {
    "1_8b": QwenConfig(hidden_size=2048, num_attention_heads=16, num_hidden_layers=24,
                       intermediate_size=11008, seq_length=8192, vocab_size=151936,
                       max_position_embeddings=8192),
    "7b": QwenConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32,
                     intermediate_size=22016, seq_length=8192, vocab_size=151936,
                     max_position_embeddings=32768),
    "14b": QwenConfig(hidden_size=5120, num_attention_heads=40, num_hidden_layers=40,
                      intermediate_size=27392, seq_length=2048, vocab_size=152064,
                      max_position_embeddings=8192),
    "72b": QwenConfig(hidden_size=8192, num_attention_heads=64, num_hidden_layers=80,
                      intermediate_size=49152, seq_length=32768, vocab_size=152064,
                      rotary_emb_base=1000000.0, max_position_embeddings=32768,
                      use_dynamic_ntk=False, use_logn_attn=False),
    # A small Qwen for tests and the CPU demo. Its vocabulary fits the byte-level tokenizer
    # (256 bytes + the 208 Qwen special tokens) that stands in when no qwen.tiktoken is around.
    "tiny": QwenConfig(hidden_size=128, num_attention_heads=4, num_hidden_layers=2,
                       intermediate_size=512, kv_channels=32, seq_length=256,
                       vocab_size=512, max_position_embeddings=1024,
                       dtype="float32", param_dtype="float32"),
}


def preset(name: str, **overrides) -> QwenConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base
