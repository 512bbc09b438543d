"""Config: presets equal the released configs, exact parameter counts, HF round trip, errors."""

import json

import jax
import numpy as np
import pytest

from qwen_jax.model.config import PRESETS, ConfigError, QwenConfig, preset
from qwen_jax.model.transformer import init_params

RELEASED = {"1_8b": "qwen-1_8b.json", "7b": "qwen-7b.json", "14b": "qwen-14b.json",
            "72b": "qwen-72b.json"}
COUNTS = {"1_8b": 1.837e9, "7b": 7.721e9, "14b": 14.167e9, "72b": 72.288e9}
MODEL_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "kv_channels", "seq_length", "rotary_emb_base", "rotary_pct",
                "layer_norm_epsilon", "vocab_size", "use_dynamic_ntk", "use_logn_attn",
                "max_position_embeddings")


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_equal_released_configs(name, hf_configs_dir):
    released = json.loads((hf_configs_dir / RELEASED[name]).read_text())
    ours = PRESETS[name].to_hf()
    for key in MODEL_FIELDS:
        assert ours[key] == released[key], key
    assert QwenConfig.from_hf(released) == PRESETS[name].replace(param_dtype="float32")


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
    config = PRESETS[name]
    assert round(config.num_params() / 1e9, 3) == COUNTS[name] / 1e9
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) \
        == config.num_params()


def test_hf_round_trip_keeps_our_fields(tmp_path):
    config = preset("tiny", window_sizes=(16, 0), remat_policy="full", scan_layers=False)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert QwenConfig.from_hf(path) == config
    assert QwenConfig.from_hf(tmp_path) == config  # a directory holding config.json
    plain = config.to_hf()
    assert "qwen_jax" not in plain and plain["model_type"] == "qwen"


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 3}, "num_attention_heads x kv_channels"),
    ({"intermediate_size": 511}, "intermediate_size=511"),
    ({"hidden_size": 0}, "hidden_size=0"),
    ({"window_sizes": (8,)}, "one entry per layer"),
    ({"window_sizes": (8, -1)}, "entries >= 0"),
    ({"dtype": "float64"}, "dtype='float64'"),
    ({"attention_impl": "cuda"}, "attention_impl='cuda'"),
    ({"remat_policy": "some"}, "remat_policy='some'"),
    ({"rotary_pct": 0.0}, "rotary_pct"),
    ({"attn_dropout_prob": 1.0}, "attn_dropout_prob"),
])
def test_invalid_configs_fail_clearly(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preset("tiny", **changes)


def test_from_hf_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        QwenConfig.from_hf(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QwenConfig.from_hf(bad)
    released = PRESETS["tiny"].to_hf()
    with pytest.raises(ConfigError, match="model_type='llama' is not supported"):
        QwenConfig.from_hf({**released, "model_type": "llama"})
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['kv_channels'\]"):
        QwenConfig.from_hf({k: v for k, v in released.items() if k != "kv_channels"})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        QwenConfig.from_hf({**released, "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="unknown key"):
        QwenConfig.from_hf({**released, "qwen_jax": {"flash": True}})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("3b")
