"""The inference command lines end to end on tiny checkpoints: generate, chat (piped stdin),
eval_ppl; and their one-line errors for bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import convert_hf
from qwen_jax.infer import chat, eval_ppl, generate
from qwen_jax.io.checkpoint import load_config, save_checkpoint
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = ("Perplexity is measured on long documents cut into windows of a fixed length. " * 12)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, ref_vectors_dir, hf_configs_dir):
    """The reference vectors' random model (its vocabulary, 1000 in the public set, must hold
    the byte-level tokenizer's 464 ids),
    imported with convert_hf.py, with the chat model's generation_config.json."""
    manifest = json.loads((ref_vectors_dir / "cases.json").read_text())
    hf_dir = tmp_path_factory.mktemp("hf")
    shutil.copyfile(ref_vectors_dir / manifest["config_file"], hf_dir / "config.json")
    shutil.copyfile(ref_vectors_dir / manifest["weights_file"], hf_dir / "model.safetensors")
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert convert_hf.main(["import", str(hf_dir), str(ckpt)]) == 0
    shutil.copyfile(hf_configs_dir / "qwen-1_8b.generation_config.json",
                    ckpt / "generation_config.json")
    return ckpt


@pytest.fixture(autouse=True)
def _no_env_vocabulary(monkeypatch):
    monkeypatch.delenv("QWEN_TIKTOKEN", raising=False)  # checkpoints choose their tokenizer


def _run(module, *args, stdin=None):
    env = {k: v for k, v in os.environ.items() if k != "QWEN_TIKTOKEN"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=240)


def test_generate_prompts_file(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\nThe capital of France is\nQwen\n")
    out = _run("qwen_jax.generate", "--checkpoint", tiny_checkpoint, "--prompts-file", prompts,
               "--max-new-tokens", 6, "--top-k", 20, "--seed", 1)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["Hello", "The capital of France is", "Qwen"]
    assert all(1 <= line["num_tokens"] <= 6 for line in lines)
    assert "kv cache: 3 x 70 slots, float32" in out.stderr  # 64 padded prompt + 6 new


def test_generate_prompt_streams(tiny_checkpoint, capsys):
    assert generate.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "Hi there",
                          "--max-new-tokens", "5", "--greedy"]) == 0
    first = capsys.readouterr()
    assert first.out.endswith("\n") and "generated" in first.err
    assert generate.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "Hi there",
                          "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out == first.out  # greedy: the same text again


def test_generate_with_the_real_vocabulary(tmp_path, qwen_tiktoken_path):
    config = QwenConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                        intermediate_size=64, kv_channels=16, seq_length=64, vocab_size=151936,
                        dtype="float32", param_dtype="float32")
    params = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    ckpt = save_checkpoint(tmp_path / "qwen-vocab", params, config,
                           tokenizer_file=qwen_tiktoken_path)
    out = _run("qwen_jax.generate", "--checkpoint", ckpt, "--prompt", "你好, Qwen",
               "--max-new-tokens", 4, "--seed", 3)
    assert out.returncode == 0, out.stderr
    assert "qwen-tiktoken" in out.stderr and "generated" in out.stderr


def test_chat_piped_two_turns(tiny_checkpoint):
    out = _run("qwen_jax.chat", "--checkpoint", tiny_checkpoint, "--max-new-tokens", 6,
               "--system", "Be brief.", stdin="Hello!\n\nAnd a second question?\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("[turn ") == 2 and "[turn 2: " in out.stderr
    assert "kv cache: 1 x 6150 slots" in out.stderr  # max_window_size 6144 + 6 new tokens


def test_eval_ppl_table(tiny_checkpoint, tmp_path):
    s = load_config(tiny_checkpoint).seq_length
    data = tmp_path / "doc.txt"
    data.write_text(TEXT * (1 + 6 * s // len(TEXT)))
    lengths = [s // 2, s, 2 * s]
    out = _run("qwen_jax.eval_ppl", "--checkpoint", tiny_checkpoint, "--data", data,
               "--lengths", ",".join(map(str, lengths)), "--dynamic-ntk", "--logn",
               "--max-windows", 3, "--batch-size", 2)
    assert out.returncode == 0, out.stderr
    rows = [line.strip("|").split("|") for line in out.stdout.splitlines()]
    assert [c.strip() for c in rows[0]] == ["technique"] + [str(n) for n in lengths]
    assert [r[0].strip() for r in rows[2:]] == ["baseline", "+ dynamic NTK",
                                                "+ dynamic NTK + LogN"]
    ppl = np.array([[float(c) for c in r[1:]] for r in rows[2:]])
    assert ppl.shape == (3, 3) and (ppl > 1).all()
    # Within the trained length the techniques change nothing; past it they do.
    np.testing.assert_allclose(ppl[:, :2], ppl[:1, :2].repeat(3, 0), rtol=1e-3)
    assert abs(ppl[0, 2] - ppl[2, 2]) > 1e-3


def test_eval_ppl_windows_and_plot(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": "short"}) + "\n")
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(data), "--lengths", "32,99999",
            "--window", "16", "--max-windows", "2"]
    assert eval_ppl.main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| baseline |") and table[2].endswith("| - |")
    assert table[3].startswith("| + window |")
    assert eval_ppl.main(args[:-4] + ["--window", "8,8,8"]) == 1
    assert "one size or 2 (one per layer)" in capsys.readouterr().err
    plot = tmp_path / "ppl.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # optional dependency: without it --plot is a clear error up front
        assert eval_ppl.main(args + ["--plot", str(plot)]) == 1
        assert "pip install" in capsys.readouterr().err and not plot.exists()
    else:
        assert eval_ppl.main(args + ["--plot", str(plot)]) == 0
        assert plot.read_bytes()[:4] == b"\x89PNG"


def _error(capsys, main, *args):
    code = main([str(a) for a in args])
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines may come first
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_bad_input_errors(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nope"
    assert "no such checkpoint directory" in _error(capsys, generate.main, "--checkpoint",
                                                    missing, "--prompt", "x")
    assert "no such checkpoint directory" in _error(capsys, chat.main, "--checkpoint", missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in _error(capsys, generate.main, "--checkpoint", tiny_checkpoint,
                                  "--prompts-file", empty)
    assert "no such file" in _error(capsys, generate.main, "--checkpoint", tiny_checkpoint,
                                    "--prompts-file", tmp_path / "absent.txt").lower()
    assert "does not fit max_length=16" in _error(
        capsys, generate.main, "--checkpoint", tiny_checkpoint, "--prompt", "x" * 40,
        "--max-length", 16, "--max-new-tokens", 4)
    assert "no text" in _error(capsys, eval_ppl.main, "--checkpoint", tiny_checkpoint,
                               "--data", empty)
    # chat: a message too long for the cache is reported, the chat goes on, the exit is 1.
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("x" * 300 + "\nhi\n"))
    assert chat.main(["--checkpoint", str(tiny_checkpoint), "--max-length", "128",
                      "--max-new-tokens", "4"]) == 1
    err = capsys.readouterr().err
    assert "does not fit max_length=128" in err and "[turn 2: " in err
