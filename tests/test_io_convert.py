"""convert_hf.py import / export and the library under it: exactness, memory, bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwen_jax.io import convert
from qwen_jax.io.checkpoint import CheckpointError, load_params, save_checkpoint
from qwen_jax.io.convert import (
    INDEX_FILE,
    ConversionError,
    hf_shapes,
    load_hf_config,
    load_hf_params,
)
from qwen_jax.model.config import QwenConfig, preset
from qwen_jax.model.transformer import Qwen

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "convert_hf.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT,
                          env=None if env is None else {**os.environ, **env})


def write_sharded(src: dict, out: pathlib.Path, n_shards: int, config_json: dict):
    """An original-layout directory written with the safetensors package, sharded + index."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(src)
    parts = np.array_split(np.arange(len(names)), n_shards)
    weight_map = {}
    for k, part in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({names[i]: src[names[i]] for i in part}, out / fname, metadata={"format": "pt"})
        weight_map.update({names[i]: fname for i in part})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config_json))
    return out


def no_leftovers(target: pathlib.Path):
    assert not target.exists()
    if target.parent.exists():
        assert not [p.name for p in target.parent.iterdir() if ".partial" in p.name]


@pytest.fixture(scope="module")
def imported(ref_vectors_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("imported") / "ckpt"
    result = cli("import", ref_vectors_dir, ckpt)
    assert result.returncode == 0, result.stderr
    return ckpt


def test_import_then_load_gives_the_same_logits(ref_vectors_dir, imported):
    config = load_hf_config(ref_vectors_dir, "float32").replace(matmul_precision="highest",
                                                                attention_impl="xla")
    direct = load_hf_params(ref_vectors_dir, config)
    loaded, loaded_config = load_params(imported)
    assert loaded_config.param_dtype == "float32"
    assert loaded_config.num_hidden_layers == config.num_hidden_layers
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, direct)
    tokens = np.load(ref_vectors_dir / "a_input_ids.npy").astype(np.int32)
    run = jax.jit(lambda p, t: Qwen(config).apply({"params": p}, t)[0])
    np.testing.assert_array_equal(np.asarray(run(loaded, tokens)), np.asarray(run(direct, tokens)))
    # and that is the original's output (the model's own tests check all cases)
    ref = np.load(ref_vectors_dir / "a_logits.npy")
    assert np.abs(np.asarray(run(loaded, tokens)) - ref).max() <= 1e-4


def _assert_same_hf(src: pathlib.Path, out: pathlib.Path):
    def tensors(d):
        if (d / INDEX_FILE).is_file():
            files = set(json.loads((d / INDEX_FILE).read_text())["weight_map"].values())
        else:
            files = {"model.safetensors"}
        found = {}
        for f in files:
            found.update(load_file(d / f))
        return found

    a, b = tensors(src), tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    config_json = json.loads((src / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == config_json


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["float32-single", "float32-sharded", "bfloat16-sharded"])
def test_import_export_round_trip_is_bit_exact(variant, ref_vectors_dir, qwen_tiktoken_path,
                                               tmp_path):
    dtype, layout = variant.split("-")
    src = ref_vectors_dir
    if dtype == "bfloat16":  # a bf16 release, sharded, with its vocabulary
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in
                   load_file(ref_vectors_dir / "model.safetensors").items()}
        config_json = json.loads((ref_vectors_dir / "config.json").read_text())
        config_json.update(bf16=False, fp32=False)  # as released: dtype flags all off
        src = write_sharded(tensors, tmp_path / "src", 3, config_json)
        shutil.copyfile(qwen_tiktoken_path, src / "qwen.tiktoken")
        (src / "generation_config.json").write_text(json.dumps(
            {"chat_format": "chatml", "eos_token_id": 151643, "repetition_penalty": 1.1,
             "top_p": 0.8, "max_window_size": 6144}))
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    result = cli("import", src, ckpt)
    assert result.returncode == 0, result.stderr
    assert f", {dtype} (as stored)" in result.stdout
    args = ["--max-shard-size", "100KB"] if layout == "sharded" else []
    result = cli("export", ckpt, out, *args)
    assert result.returncode == 0, result.stderr
    assert (out / INDEX_FILE).is_file() == (layout == "sharded")
    if layout == "sharded":
        assert len(list(out.glob("model-*.safetensors"))) > 2
    _assert_same_hf(src, out)
    if dtype == "bfloat16":
        assert (out / "qwen.tiktoken").read_bytes() == qwen_tiktoken_path.read_bytes()
        for name in ("qwen.tiktoken", "generation_config.json"):  # travel in and out
            assert (ckpt / name).read_bytes() == (src / name).read_bytes()
            assert (out / name).read_bytes() == (src / name).read_bytes()


def test_import_with_dtype_casts(ref_vectors_dir, tmp_path):
    result = cli("import", ref_vectors_dir, tmp_path / "ckpt", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "bfloat16 (stored as float32)" in result.stdout
    params, config = load_params(tmp_path / "ckpt", as_numpy=True)
    assert config.param_dtype == "bfloat16"
    direct = load_hf_params(ref_vectors_dir, load_hf_config(ref_vectors_dir, "float32"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        a, b.astype(ml_dtypes.bfloat16)), params, direct)
    # exported as what it now is: bf16 tensors, dtype flags saying so, the rest as imported
    result = cli("export", tmp_path / "ckpt", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((ref_vectors_dir / "config.json").read_text())
    assert (exported["bf16"], exported["fp32"]) == (True, False)
    assert {k: v for k, v in exported.items() if k not in ("bf16", "fp32")} == {
        k: v for k, v in source.items() if k not in ("bf16", "fp32")}
    src = load_file(ref_vectors_dir / "model.safetensors")
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name in src:
        np.testing.assert_array_equal(out[name], src[name].astype(ml_dtypes.bfloat16))


def test_block_size_does_not_change_the_result(ref_vectors_dir, monkeypatch):
    # Blocks of an odd byte size split rows across c_attn's q | k | v boundaries.
    config = load_hf_config(ref_vectors_dir, "float32")
    whole = load_hf_params(ref_vectors_dir, config)
    monkeypatch.setattr(convert, "_BLOCK_BYTES", 1000)
    blocked = load_hf_params(ref_vectors_dir, config)
    jax.tree.map(np.testing.assert_array_equal, blocked, whole)


def test_7b_key_set_and_sizes_match_the_released_index(hf_configs_dir):
    index = json.loads((hf_configs_dir / "qwen-7b.safetensors.index.json").read_text())
    config = QwenConfig.from_hf(hf_configs_dir / "qwen-7b.json")
    expected = hf_shapes(config)
    assert set(index["weight_map"]) == set(expected)
    assert expected == hf_shapes(preset("7b"))
    # bf16: 2 bytes per parameter; the index's total_size pins every shape, not just the names
    assert sum(int(np.prod(s)) for s in expected.values()) * 2 == index["metadata"]["total_size"]


@pytest.mark.slow
def test_import_peak_memory_is_near_the_parameter_size(tmp_path):
    config = QwenConfig(hidden_size=512, num_attention_heads=8, kv_channels=64,
                        num_hidden_layers=4, intermediate_size=2752, vocab_size=32000,
                        seq_length=256, max_position_embeddings=256)
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape, dtype=np.float32)
               for name, shape in hf_shapes(config).items()}
    param_bytes = sum(t.nbytes for t in tensors.values())
    src = write_sharded(tensors, tmp_path / "src", 3, config.to_hf())
    del tensors

    def peak_rss_bytes(argv):
        # Through a small wrapper: a child's ru_maxrss also counts the memory of the process
        # that forked it (here pytest, with torch loaded), so fork from a small one.
        wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                   "stdout=subprocess.DEVNULL); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        result = subprocess.run([sys.executable, "-c", wrapper, *argv], cwd=ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return int(result.stdout) * 1024  # kilobytes on Linux

    # The fixed cost: interpreter, jax (with its CPU backend up, as the save needs), orbax.
    baseline = peak_rss_bytes([sys.executable, "-c", "import convert_hf, qwen_jax.io.convert, "
                               "qwen_jax.io.checkpoint, jax; jax.devices()"])
    peak = peak_rss_bytes([sys.executable, str(ROOT / "convert_hf.py"), "import", str(src),
                           str(tmp_path / "ckpt")])
    ratio = (peak - baseline) / param_bytes
    print(f"params {param_bytes / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB, "
          f"import peak {peak / 2**20:.0f} MiB, (peak - baseline) / params = {ratio:.2f}")
    assert param_bytes > 150 * 2**20
    assert ratio <= 1.5
    params, _ = load_params(tmp_path / "ckpt", as_numpy=True)
    np.testing.assert_array_equal(params["lm_head"]["kernel"][:, :3],
                                  load_file(next(src.glob("*00003-of-*")))["lm_head.weight"][:3].T)


# ----------------------------------------------------------------------------- bad input
def _vectors(ref_vectors_dir):
    return load_file(ref_vectors_dir / "model.safetensors")


def _config(ref_vectors_dir, **changes):
    data = json.loads((ref_vectors_dir / "config.json").read_text())
    data.update(changes)
    return data


def _single(d, tensors, config_json):
    d.mkdir()
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(config_json))


def _case_missing_shard(ref, d):
    write_sharded(_vectors(ref), d, 2, _config(ref))
    (d / "model-00002-of-00002.safetensors").unlink()
    return ["model-00002-of-00002.safetensors", "missing shard"]


def _case_truncated(ref, d):
    shutil.copytree(ref, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) - 1000])
    return ["model.safetensors", "truncated"]


def _case_garbage_header(ref, d):
    shutil.copytree(ref, d)
    header = b"{not json at all"
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    return ["model.safetensors", "not a safetensors file"]


def _case_missing_key(ref, d):
    tensors = _vectors(ref)
    del tensors["transformer.h.1.mlp.w1.weight"]
    _single(d, tensors, _config(ref))
    return ["missing tensor", "transformer.h.1.mlp.w1.weight"]


def _case_unexpected_key(ref, d):
    tensors = _vectors(ref)
    tensors["transformer.h.0.attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    _single(d, tensors, _config(ref))
    return ["unexpected tensor", "transformer.h.0.attn.rotary_emb.inv_freq"]


def _case_wrong_shape(ref, d):
    tensors = _vectors(ref)
    name = "transformer.h.0.mlp.c_proj.weight"
    tensors[name] = tensors[name][:, :100]
    _single(d, tensors, _config(ref))
    return ["transformer.h.0.mlp.c_proj.weight", "[64, 100]", "[64, 128]"]


def _case_more_layers_in_config(ref, d):
    _single(d, _vectors(ref), _config(ref, num_hidden_layers=3))
    return ["missing tensor", "transformer.h.2.", "3 layers"]


def _case_hidden_mismatch(ref, d):
    _single(d, _vectors(ref), _config(ref, hidden_size=128, kv_channels=32))
    return ["'transformer.wte.weight' has shape [1000, 64]", "implies [1000, 128]"]


def _case_model_type_qwen2(ref, d):
    _single(d, _vectors(ref), _config(ref, model_type="qwen2"))
    return ["config.json", "model_type='qwen2'", "not supported"]


def _case_model_type_llama(ref, d):
    _single(d, _vectors(ref), _config(ref, model_type="llama"))
    return ["config.json", "model_type='llama'"]


def _case_missing_config(ref, d):
    shutil.copytree(ref, d)
    (d / "config.json").unlink()
    return ["config.json", "no such config file"]


def _case_unsupported_dtype(ref, d):
    tensors = _vectors(ref)
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"].astype(np.float64)
    _single(d, tensors, _config(ref))
    return ["model.safetensors", "transformer.ln_f.weight", "F64"]


BAD_INPUTS = {name[6:]: fn for name, fn in globals().items() if name.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_error_line_and_no_checkpoint(case, ref_vectors_dir, tmp_path):
    src = tmp_path / "src"
    expected = BAD_INPUTS[case](ref_vectors_dir, src)
    target = tmp_path / "out" / "ckpt"
    result = cli("import", src, target)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    no_leftovers(target)


def test_library_raises_conversion_error(ref_vectors_dir, tmp_path):
    _case_missing_key(ref_vectors_dir, tmp_path / "src")
    with pytest.raises(ConversionError, match="transformer.h.1.mlp.w1.weight"):
        load_hf_params(tmp_path / "src", load_hf_config(tmp_path / "src"))


def test_failed_save_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match=r"params\['a'\]: a object, not an array"):
        save_checkpoint(target, {"a": object()}, preset("tiny"))
    no_leftovers(target)
    with pytest.raises(FileNotFoundError):  # fails after the parameters were written
        save_checkpoint(target, {"a": np.zeros(3)}, preset("tiny"),
                        tokenizer_file=tmp_path / "no-such.tiktoken")
    no_leftovers(target)
    with pytest.raises(CheckpointError, match="not a qwen_jax checkpoint"):
        load_params(target)


def test_existing_target_and_missing_checkpoint(imported, ref_vectors_dir, tmp_path):
    result = cli("import", ref_vectors_dir, imported)
    assert result.returncode == 1
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    result = cli("export", tmp_path / "nothing", tmp_path / "out")
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert "nothing" in result.stderr and "not a qwen_jax checkpoint" in result.stderr
    no_leftovers(tmp_path / "out")
    result = cli("export", imported, tmp_path / "out", "--max-shard-size", "lots")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "invalid size 'lots'" in result.stderr


def test_offline_repo_id_says_so(tmp_path):
    result = cli("import", "no-such-org/Qwen-Nothing", tmp_path / "ckpt",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no-such-org/Qwen-Nothing: ")
    assert "HF_HUB_OFFLINE" in lines[0] and "pass the directory" in lines[0]
    no_leftovers(tmp_path / "ckpt")


# ----------------------------------------------------------------------------- tokenizer files
def test_tokenizer_command_writes_the_two_files(qwen_tiktoken_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    from qwen_jax.data.tokenizer import QwenTokenizer

    out = tmp_path / "tok"
    result = cli("tokenizer", qwen_tiktoken_path, out, "--model-max-length", "2048")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 2048
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = QwenTokenizer(qwen_tiktoken_path)
    for text in ["Hello, world!", "<|im_start|>system\nYou are helpful.<|im_end|>", "数字 12345"]:
        assert hf.encode(text) == ours.encode(text), text
    before = (out / "tokenizer.json").stat().st_mtime_ns
    result = cli("tokenizer", qwen_tiktoken_path, out)
    assert result.returncode == 1 and "--overwrite" in result.stderr
    assert (out / "tokenizer.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("case", ["missing", "garbage", "too-few-tokens"])
def test_tokenizer_command_bad_file_leaves_nothing(case, qwen_tiktoken_path, tmp_path):
    vocab = tmp_path / "qwen.tiktoken"
    if case == "garbage":
        vocab.write_bytes(b"\x00\xffnot base64 at all\n")
    elif case == "too-few-tokens":
        vocab.write_bytes(b"\n".join(qwen_tiktoken_path.read_bytes().splitlines()[:1000]))
    out = tmp_path / "out" / "tok"
    result = cli("tokenizer", vocab, out)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(vocab) in lines[0]
    assert not out.exists() and not (tmp_path / "out").exists()
