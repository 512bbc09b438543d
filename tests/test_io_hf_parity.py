"""Parity with transformers' Qwen2ForCausalLM (an independent implementation) and the
`convert_hf.py check` command built on it."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from qwen_jax.io import hf_reference
from qwen_jax.io.checkpoint import load_params, save_checkpoint
from qwen_jax.io.convert import ConversionError, hf_shapes, load_hf_params
from qwen_jax.model.config import QwenConfig

pytest.importorskip("torch")  # the [test] extra installs it; without it nothing here can run
ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16, num_hidden_layers=2,
                    intermediate_size=256, vocab_size=1000, seq_length=64,
                    max_position_embeddings=512, dtype="float32", param_dtype="float32",
                    matmul_precision="highest", attention_impl="xla")


def random_weights(config: QwenConfig, seed=0) -> dict:
    """O(1)-scaled weights (unit-variance activations, logit std ~1) so mistakes show."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            w = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("c_attn.bias"):
            w = 0.5 * rng.standard_normal(shape)
        elif name == "transformer.wte.weight":
            w = rng.standard_normal(shape)
        else:  # [out, in] Linear weights
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = w.astype(np.float32)
    return out


def write_hf_dir(path: pathlib.Path, config: QwenConfig, tensors: dict) -> pathlib.Path:
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config.to_hf()))
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    tensors = random_weights(CONFIG)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    return (write_hf_dir(root / "f32", CONFIG, tensors),
            write_hf_dir(root / "bf16", CONFIG.replace(param_dtype="bfloat16"), bf16))


def tokens(batch, length, seed=1):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch, length))


@pytest.mark.parametrize("length,flags", [(48, True), (96, False)])
def test_float32_matches_qwen2(hf_dirs, length, flags):
    # Within seq_length the NTK/LogN flags are no-ops, so they stay on there; beyond it Qwen2
    # (which has neither) is only the reference with them off.
    config = CONFIG.replace(use_dynamic_ntk=flags, use_logn_attn=flags)
    ids = tokens(3, length)
    ref = hf_reference.torch_logits(hf_reference.build_qwen2(hf_dirs[0], config, length), ids)
    ours = hf_reference.our_logits(load_hf_params(hf_dirs[0], config), config,
                                   ids.astype(np.int32))
    assert ref.std() > 0.5  # logits O(1): a wrong mapping would show
    stats = hf_reference.compare(ref, ours)
    print(f"float32 length {length}: {stats}")
    assert stats["max_abs_diff"] <= 1e-4
    assert stats["top1_agreement"] == 1.0


def test_bfloat16_against_float32_reference(hf_dirs):
    """A bf16 checkpoint: ours with bf16 params and bf16 compute vs Qwen2 in float32 on the
    same (bf16-valued) weights, so only our compute precision differs. bf16 keeps 8 bits of
    mantissa (relative step 2^-8 = 0.4%) and every activation is rounded to it, so the logits
    drift by a few percent of their scale. Measured over 5 weight/token seeds: max diff
    0.033-0.041 x the logit std (std ~1), mean KL 2.3e-5-2.7e-5, top-1 agreement 0.95-0.99 (a
    random 1000-way vocabulary has many near-ties). The bounds leave about 2x room."""
    config = CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16", matmul_precision="default")
    ids = tokens(3, 48)
    ref = hf_reference.torch_logits(hf_reference.build_qwen2(hf_dirs[1], config, 48), ids)
    params = load_hf_params(hf_dirs[1], config)
    assert params["lm_head"]["kernel"].dtype == ml_dtypes.bfloat16
    ours = hf_reference.our_logits(params, config, ids.astype(np.int32))
    stats = hf_reference.compare(ref, ours)
    scale = float(ref.std())
    print(f"bfloat16: {stats}, logit std {scale:.3f}, max |logit| {np.abs(ref).max():.2f}")
    assert stats["max_abs_diff"] <= 0.08 * scale
    assert stats["mean_kl"] <= 1e-4
    assert stats["top1_agreement"] >= 0.9
    # and it is the bf16 rounding that differs: the same weights in float32 match to 1e-4
    ours32 = hf_reference.our_logits(load_hf_params(hf_dirs[1], CONFIG), CONFIG,
                                     ids.astype(np.int32))
    assert hf_reference.compare(ref, ours32)["max_abs_diff"] <= 1e-4


def test_state_dict_mapping_is_complete(hf_dirs):
    model = hf_reference.build_qwen2(hf_dirs[0], CONFIG, 64)
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not [n for n, b in model.named_buffers() if b.device.type == "meta"]
    with pytest.raises(ConversionError, match="missing tensor"):
        hf_reference.build_qwen2(hf_dirs[0], CONFIG.replace(num_hidden_layers=3), 64)


# ----------------------------------------------------------------------------- the CLI check
def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert_hf.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))


def _numbers(stdout):
    return {k: float(v) for k, v in re.findall(r"^(\w+) ([-+.\de]+)$", stdout, re.MULTILINE)}


@pytest.fixture(scope="module")
def vectors_checkpoint(ref_vectors_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("check") / "ckpt"
    result = cli("import", ref_vectors_dir, ckpt)
    assert result.returncode == 0, result.stderr
    return ckpt


@pytest.mark.slow
def test_check_command_on_the_reference_vectors(ref_vectors_dir, vectors_checkpoint):
    result = cli("check", ref_vectors_dir, vectors_checkpoint, "--length", "48", "--batch", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "use_dynamic_ntk=False, use_logn_attn=False" in result.stdout
    got = _numbers(result.stdout)
    print(result.stdout)
    assert got["max_abs_logit_diff"] <= 1e-4
    assert 0 <= got["mean_kl_ref_ours"] <= 1e-9
    assert got["top1_agreement"] == 1.0


@pytest.mark.slow
def test_check_command_fails_on_perturbed_weights(ref_vectors_dir, vectors_checkpoint, tmp_path):
    params, config = load_params(vectors_checkpoint, as_numpy=True)
    params = jax.tree.map(np.array, params)
    params["layers"]["mlp"]["down"]["kernel"][1] *= 1.05  # a 5% error in one matrix
    save_checkpoint(tmp_path / "bad", params, config)
    result = cli("check", ref_vectors_dir, tmp_path / "bad", "--length", "48")
    assert result.returncode == 1
    assert result.stderr.startswith("error: max abs logit diff")
    assert "exceeds --atol" in result.stderr
    assert _numbers(result.stdout)["max_abs_logit_diff"] > 1e-3


def test_check_rejects_a_checkpoint_of_another_model(hf_dirs, vectors_checkpoint, capsys):
    import convert_hf

    # same shapes, other weights
    args = ["--length", "8"]
    assert convert_hf.main(["check", str(hf_dirs[0]), str(vectors_checkpoint), *args]) == 1
    assert "exceeds --atol" in capsys.readouterr().err
    wide = CONFIG.replace(hidden_size=128, kv_channels=32)
    wrong = write_hf_dir(hf_dirs[0].parent / "wide", wide, random_weights(wide))
    assert convert_hf.main(["check", str(wrong), str(vectors_checkpoint), "--length", "8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hidden_size=64 vs 128" in err


def test_remote_code_failure_is_one_clear_error(ref_vectors_dir, vectors_checkpoint, capsys):
    import convert_hf

    # the reference vectors hold no modeling_qwen.py: the error must say what failed
    assert convert_hf.main(["check", str(ref_vectors_dir), str(vectors_checkpoint), "--length",
                            "8", "--trust-remote-code"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load the checkpoint's own modeling code" in err
