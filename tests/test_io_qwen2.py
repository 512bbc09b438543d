"""The Qwen2 layout (qwen_jax.io.qwen2): a bit-exact round trip, and transformers'
Qwen2ForCausalLM, built from our config dict and mapped weights and loaded back from disk
without trust_remote_code, gives our logits; `convert_hf.py export --format qwen2` writes a
directory transformers loads natively (model, tokenizer, reward model) and `check` accepts."""

import contextlib
import io
import json
import re

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import convert_hf
from qwen_jax.data.tokenizer import QwenTokenizer
from qwen_jax.io.checkpoint import save_checkpoint
from qwen_jax.io.convert import INDEX_FILE
from qwen_jax.io.qwen2 import (
    from_qwen2_state_dict,
    qwen2_config,
    qwen2_shapes,
    qwen2_tensors,
    to_qwen2_state_dict,
)
from qwen_jax.model.config import QwenConfig, preset
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


def test_released_configs_map_to_the_same_parameter_count(hf_configs_dir):
    from qwen_jax.io.convert import hf_shapes

    for name in ("qwen-1_8b", "qwen-7b", "qwen-14b", "qwen-72b"):
        config = QwenConfig.from_hf(hf_configs_dir / f"{name}.json")
        ours = qwen2_config(config)
        assert ours["intermediate_size"] * 2 == config.intermediate_size, name
        assert ours["rope_theta"] == config.rotary_emb_base, name
        count = sum(int(np.prod(s)) for s in qwen2_shapes(config).values())
        assert count == sum(int(np.prod(s)) for s in hf_shapes(config).values()), name
        reward = qwen2_shapes(config, lm_head=False, score=True)
        assert "lm_head.weight" not in reward and reward["score.weight"] == (1, config.hidden_size)


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


def test_tensors_keep_the_stored_dtype_in_shape_order(params):
    bf16 = CONFIG.replace(param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    got = list(qwen2_tensors(params16, bf16))
    assert [(k, v.shape) for k, v in got] == list(qwen2_shapes(bf16).items())
    assert all(v.dtype == ml_dtypes.bfloat16 for _, v in got)
    sd = to_qwen2_state_dict(params16, bf16)
    for k, v in got:
        np.testing.assert_array_equal(v.astype(np.float32), sd[k], err_msg=k)


# ----------------------------------------------------------------- export --format qwen2
QWEN_VOCAB_CONFIG = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16,
                               num_hidden_layers=2, intermediate_size=256, vocab_size=151936,
                               seq_length=512, max_position_embeddings=1024, dtype="float32",
                               param_dtype="float32")
GENERATION_CONFIG = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                     "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8,
                     "repetition_penalty": 1.1, "max_window_size": 6144}


def run_main(*args):
    """(exit status, stdout, stderr) of convert_hf.main in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = convert_hf.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_ours(params, config, tokens):
    config = config.replace(matmul_precision="highest", attention_impl="xla")
    with jax.default_matmul_precision("highest"):
        logits, _ = jax.jit(lambda p, t: Qwen(config).apply({"params": p}, t))(
            params, tokens.astype(np.int32))
    return np.asarray(logits)


def load_exported(out, cls=None):
    model, info = (cls or transformers.AutoModelForCausalLM).from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    return model.eval()


@pytest.fixture(scope="module")
def qwen_vocab_export(qwen_tiktoken_path, tmp_path_factory):
    """A checkpoint with the Qwen vocabulary (vocab_size 151936), its qwen.tiktoken and a
    generation config, and its export --format qwen2: (params, ckpt, out, stdout)."""
    root = tmp_path_factory.mktemp("qwen2_export")
    params = random_params(QWEN_VOCAB_CONFIG)
    ckpt = save_checkpoint(root / "ckpt", params, QWEN_VOCAB_CONFIG,
                           tokenizer_file=qwen_tiktoken_path)
    (ckpt / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    code, stdout, stderr = run_main("export", ckpt, root / "out", "--format", "qwen2")
    assert code == 0, stderr
    return params, ckpt, root / "out", stdout


def test_qwen2_export_files_and_note(qwen_vocab_export):
    _, ckpt, out, stdout = qwen_vocab_export
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(
        qwen2_config(QWEN_VOCAB_CONFIG)))
    assert (out / "generation_config.json").read_bytes() == (
        ckpt / "generation_config.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512
    notes = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, stdout
    assert "dynamic NTK and LogN" in notes[0] and "seq_length=512" in notes[0]
    assert "exact within 512 tokens" in notes[0]
    assert "Qwen2ForCausalLM" in stdout and "tokenizer.json" in stdout


def test_qwen2_export_loads_natively_with_our_logits(qwen_vocab_export):
    params, _, out, _ = qwen_vocab_export
    model = load_exported(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.generation_config.top_p == 0.8
    assert model.generation_config.eos_token_id == 151643
    # the checkpoint's config as it is (dynamic NTK and LogN on): within seq_length they change
    # nothing, so the export is the same model there
    assert QWEN_VOCAB_CONFIG.use_dynamic_ntk and QWEN_VOCAB_CONFIG.use_logn_attn
    tokens = np.random.default_rng(4).integers(0, QWEN_VOCAB_CONFIG.vocab_size,
                                               (1, QWEN_VOCAB_CONFIG.seq_length))
    ours = run_ours(params, QWEN_VOCAB_CONFIG, tokens)
    assert ours.std() > 0.5
    diff = np.max(np.abs(torch_logits(model, tokens) - ours))
    print(f"export --format qwen2, 1 x 512 tokens, vocab 151936: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_qwen2_export_tokenizer_gives_our_ids(qwen_vocab_export, qwen_tiktoken_path):
    _, _, out, _ = qwen_vocab_export
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = QwenTokenizer(qwen_tiktoken_path)
    for text in ["Hello, world!", "  def f(x):\n\treturn x ** 2\n", "你好，世界。1234567",
                 "<|im_start|>user\nHi<|im_end|>\n", "naïve café 😀 \r\n\n  "]:
        assert hf.encode(text) == ours.encode(text), text
    assert hf.eos_token_id == hf.pad_token_id == ours.eod_id


def test_check_accepts_the_qwen2_export(qwen_vocab_export):
    _, ckpt, out, _ = qwen_vocab_export
    code, stdout, stderr = run_main("check", out, ckpt, "--length", "512")
    assert code == 0, stdout + stderr
    assert "loaded from" in stdout and "use_dynamic_ntk=False, use_logn_attn=False" in stdout
    got = dict(re.findall(r"^(\w+) ([-+.\de]+)$", stdout, re.MULTILINE))
    print(stdout)
    assert float(got["max_abs_logit_diff"]) <= 1e-4
    assert float(got["top1_agreement"]) == 1.0


def test_check_refuses_a_qwen2_export_of_another_config(qwen_vocab_export, tmp_path):
    _, ckpt, out, _ = qwen_vocab_export
    other = tmp_path / "other"
    other.mkdir()
    for f in out.iterdir():
        (other / f.name).symlink_to(f)
    (other / "config.json").unlink()
    (other / "config.json").write_text(json.dumps(qwen2_config(
        QWEN_VOCAB_CONFIG.replace(rotary_emb_base=1e6))))
    code, _, stderr = run_main("check", other, ckpt, "--length", "8")
    assert code == 1 and stderr.count("\n") == 1
    assert "config differs" in stderr and "rope_theta=10000.0 vs 1000000.0" in stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(params, tmp_path_factory):
    """A checkpoint without a vocabulary file (CONFIG, float32)."""
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", params, CONFIG)


def test_qwen2_export_sharded_bfloat16(params, tiny_checkpoint, tokens, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_main("export", tiny_checkpoint, out, "--format", "qwen2",
                                    "--max-shard-size", "100KB", "--dtype", "bfloat16")
    assert code == 0, stderr
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / INDEX_FILE).is_file()
    assert not (out / "model.safetensors").exists()
    assert "no tokenizer files" in stdout and "--tiktoken" in stdout
    assert not (out / "tokenizer.json").exists()
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["dtype"] == "bfloat16"
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert set(weight_map) == set(qwen2_shapes(CONFIG))
    for shard in shards:
        held = [k for k, v in weight_map.items() if v == shard.name]
        assert shard.stat().st_size <= 100_000 or len(held) == 1
        with safe_open(shard, framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = load_exported(out)
    # the exported model is ours with the weights rounded to bfloat16
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                           params)
    diff = np.max(np.abs(torch_logits(model, tokens) - run_ours(rounded, CONFIG, tokens)))
    print(f"sharded bfloat16 export ({len(shards)} files): max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_qwen2_export_errors_leave_nothing(qwen_vocab_export, tiny_checkpoint,
                                           qwen_tiktoken_path, tmp_path):
    _, ckpt, _, _ = qwen_vocab_export
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not a vocabulary\n")
    target = tmp_path / "out"
    for args, expected in [
            ((ckpt, "--tiktoken", bad), ["bad.tiktoken", "corrupt Qwen vocabulary file"]),
            ((tiny_checkpoint, "--tiktoken", qwen_tiktoken_path),
             ["151,851 ids", "vocab_size is 512"]),
            ((tiny_checkpoint, "--tiktoken", qwen_tiktoken_path, "--format", "qwen"),
             ["--tiktoken is for --format qwen2"])]:
        fmt = [] if "--format" in args else ["--format", "qwen2"]
        code, _, stderr = run_main("export", args[0], target, *args[1:], *fmt)
        assert code == 1 and stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
        for text in expected:
            assert text in stderr, (text, stderr)
        assert not target.exists()
        assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_qwen2_export_of_a_reward_run(tmp_path):
    """A reward run (score head, no lm_head) exports as Qwen2ForSequenceClassification, whose
    score at the last non-padding token is our reward."""
    from qwen_jax.align import models
    from qwen_jax.data.tokenizer import ByteTokenizer
    from qwen_jax.io.checkpoint import run_kind
    from qwen_jax.train.checkpoint import TrainCheckpointer

    params = models.init_scalar_params(CONFIG, jax.random.PRNGKey(1),
                                       backbone=random_params(CONFIG))
    params["score"]["kernel"] = np.asarray(np.random.default_rng(2).standard_normal(
        (CONFIG.hidden_size, 1)) / np.sqrt(CONFIG.hidden_size), np.float32)
    workdir = tmp_path / "run"
    saver = TrainCheckpointer(workdir / "checkpoints", async_save=False)
    saver.save(5, {"params": params}, {}, {"model": CONFIG.to_hf(include_ours=True),
                                           "tokenizer": "bytes", "kind": "reward"})
    saver.close()
    assert run_kind(workdir) == "reward"
    out = tmp_path / "out"
    code, stdout, stderr = run_main("export", workdir, out, "--format", "qwen2")
    assert code == 0, stderr
    assert "Qwen2ForSequenceClassification" in stdout and "byte-level" in stdout
    model = load_exported(out, transformers.AutoModelForSequenceClassification)
    assert type(model).__name__ == "Qwen2ForSequenceClassification"
    pad = model.config.pad_token_id
    tok = ByteTokenizer()
    assert pad not in (tok.eod_id, tok.im_end_id) and f"pad_token_id {pad}" in stdout
    # right-padded rows that end, as the reward data does, with <|endoftext|> or <|im_end|>
    lengths, seq_len = [24, 17, 9, 2], 24
    rng = np.random.default_rng(3)
    tokens = np.full((len(lengths), seq_len), pad, np.int32)
    segments = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(0, 256, n)
        tokens[i, n - 1] = (tok.eod_id, tok.im_end_id)[i % 2]
        segments[i, :n] = 1
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(models.rewards(params, CONFIG, tokens, segments))
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert theirs.shape == (len(lengths), 1) and np.abs(ours).max() > 0.1
    diff = np.max(np.abs(ours - theirs[:, 0]))
    print(f"reward export: max abs reward diff {diff:.2e}")
    assert diff <= 1e-4
