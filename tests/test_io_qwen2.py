"""The Qwen2 layout (qwen_jax.io.qwen2): a bit-exact round trip, and transformers'
Qwen2ForCausalLM, built from our config dict and mapped weights and loaded back from disk
without trust_remote_code, gives our logits."""

import json

import jax
import numpy as np
import pytest

from qwen_jax.io.qwen2 import (
    from_qwen2_state_dict,
    qwen2_config,
    qwen2_shapes,
    to_qwen2_state_dict,
)
from qwen_jax.model.config import preset
from qwen_jax.model.transformer import Qwen, unstack_layers

from scaled_weights import scaled_params as random_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Qwen2 has no dynamic NTK / LogN: the comparison runs ours with both off.
CONFIG = preset("tiny", use_dynamic_ntk=False, use_logn_attn=False, dtype="float32",
                param_dtype="float32", matmul_precision="highest", attention_impl="xla")
BATCH, LENGTH = 2, 80


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, CONFIG.vocab_size, (BATCH, LENGTH))


@pytest.fixture(scope="module")
def our_logits(params, tokens):
    with jax.default_matmul_precision("highest"):
        logits, _ = jax.jit(lambda p, t: Qwen(CONFIG).apply({"params": p}, t, train=False))(
            params, tokens.astype(np.int32))
    logits = np.asarray(logits)
    assert logits.std() > 0.5  # O(1) logits: a wrong mapping cannot hide under atol
    return logits


def torch_logits(model, tokens):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)), use_cache=False)
    return out.logits.float().numpy()


def build(state_dict):
    cfg = transformers.Qwen2Config(**qwen2_config(CONFIG), attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.float32)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()},
                          strict=True)
    return model.eval()


def assert_same(params, params2):
    flat1 = jax.tree_util.tree_flatten_with_path(params)[0]
    flat2 = dict(jax.tree_util.tree_flatten_with_path(params2)[0])
    assert len(flat1) == len(flat2)
    for path, x in flat1:
        y = flat2[path]
        assert y.shape == x.shape and y.dtype == x.dtype, path
        np.testing.assert_array_equal(y, np.asarray(x), err_msg=str(path))


def test_config_dict():
    d = qwen2_config(CONFIG)
    # Qwen v1 counts both SwiGLU branches in intermediate_size; Qwen2 counts one
    assert d["intermediate_size"] == CONFIG.mlp_width == CONFIG.intermediate_size // 2
    assert d["num_key_value_heads"] == d["num_attention_heads"] == CONFIG.num_attention_heads
    assert d["tie_word_embeddings"] is False and "auto_map" not in d
    cfg = transformers.Qwen2Config(**json.loads(json.dumps(d)))
    assert cfg.rope_parameters["rope_theta"] == CONFIG.rotary_emb_base
    assert cfg.head_dim == CONFIG.head_dim and cfg.intermediate_size == CONFIG.mlp_width
    with pytest.raises(ValueError, match="rotary_pct"):
        qwen2_config(CONFIG.replace(rotary_pct=0.5))


def test_round_trip_is_bit_exact(params):
    sd = to_qwen2_state_dict(params, CONFIG)
    assert {k: v.shape for k, v in sd.items()} == qwen2_shapes(CONFIG)
    assert all(v.dtype == np.float32 for v in sd.values())
    assert_same(params, from_qwen2_state_dict(sd, CONFIG))
    # the unstacked layout maps to the very same tensors
    unstacked, _ = unstack_layers(params, CONFIG)
    sd2 = to_qwen2_state_dict(unstacked, CONFIG)
    assert sd2.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(sd2[k], sd[k], err_msg=k)
    # bfloat16 params survive float32 and back exactly
    bf16 = CONFIG.replace(param_dtype="bfloat16", dtype="bfloat16")
    params16 = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), params)
    assert_same(params16, from_qwen2_state_dict(to_qwen2_state_dict(params16, bf16), bf16))


def test_without_lm_head(params):
    body = {k: v for k, v in params.items() if k != "lm_head"}
    sd = to_qwen2_state_dict(body, CONFIG)
    assert "lm_head.weight" not in sd and "model.norm.weight" in sd
    assert_same(body, from_qwen2_state_dict(sd, CONFIG))


def test_state_dict_errors(params):
    sd = to_qwen2_state_dict(params, CONFIG)
    with pytest.raises(ValueError, match="missing"):
        from_qwen2_state_dict(sd, CONFIG.replace(num_hidden_layers=3))
    bad = dict(sd, **{"model.norm.weight": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        from_qwen2_state_dict(bad, CONFIG)


def test_qwen2_logits_match(params, tokens, our_logits):
    sd = to_qwen2_state_dict(params, CONFIG)
    model = build(sd)
    ref = torch_logits(model, tokens)
    print(f"Qwen2ForCausalLM: max abs logit diff {np.max(np.abs(ref - our_logits)):.2e}")
    assert np.max(np.abs(ref - our_logits)) <= 1e-4
    assert (ref.argmax(-1) == our_logits.argmax(-1)).all()
    # the comparison can fail: the two SwiGLU branches swapped (v1's w1/w2 naming trap)
    for i in range(CONFIG.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"] = (sd[p + "up_proj.weight"],
                                                                sd[p + "gate_proj.weight"])
    assert np.max(np.abs(torch_logits(build(sd), tokens) - our_logits)) > 1e-2
    # and the weights read back from the torch module are ours, bit for bit
    assert_same(params, from_qwen2_state_dict(model.state_dict(), CONFIG))


def test_saved_model_loads_without_remote_code(params, tokens, our_logits, tmp_path):
    from safetensors.numpy import save_file

    sd = to_qwen2_state_dict(params, CONFIG)
    saved = tmp_path / "save_pretrained"
    build(sd).save_pretrained(saved)
    # and a directory written by hand: our config dict as config.json, our tensors
    direct = tmp_path / "direct"
    direct.mkdir()
    (direct / "config.json").write_text(json.dumps(qwen2_config(CONFIG), indent=2))
    save_file(sd, str(direct / "model.safetensors"))
    for path in (saved, direct):
        assert (path / "model.safetensors").is_file()
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager",
            output_loading_info=True)
        assert not any(info.values()), info  # nothing missing, unexpected or mismatched
        model.eval()
        assert type(model).__name__ == "Qwen2ForCausalLM"
        assert model.config.intermediate_size == CONFIG.mlp_width
        diff = np.max(np.abs(torch_logits(model, tokens) - our_logits))
        print(f"{path.name}: max abs logit diff {diff:.2e}")
        assert diff <= 1e-4, path.name
