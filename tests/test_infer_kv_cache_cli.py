"""`--kv-cache {bf16,int8}` of python -m qwen_jax.generate, chat and eval_ppl, in process, on
the int8 KV-cache vectors' tiny model ($QWEN_KVQ_VECTORS) imported with convert_hf.py."""

import io
import os
import pathlib
import shutil

import pytest

import convert_hf
from qwen_jax.infer import chat, eval_ppl, generate

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = "The int8 cache stores keys and values as bytes with a scale and a zero point. " * 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = pathlib.Path(os.environ.get("QWEN_KVQ_VECTORS", ROOT.parent / "shared/reference/kvq"))
    hf_dir = tmp_path_factory.mktemp("hf")
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folder / name, hf_dir / name)
    ckpt = tmp_path_factory.mktemp("ckpt") / "kvq"
    assert convert_hf.main(["import", str(hf_dir), str(ckpt)]) == 0
    return ckpt


@pytest.fixture(autouse=True)
def _no_env_vocabulary(monkeypatch):
    monkeypatch.delenv("QWEN_TIKTOKEN", raising=False)  # the checkpoint chooses its tokenizer


def test_generate_int8_and_bf16(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "4",
            "--greedy"]
    assert generate.main(args + ["--kv-cache", "int8"]) == 0
    err = capsys.readouterr().err
    assert "x 68 slots, int8 (uint8 + float32 scale/zero)" in err and "generated" in err
    assert generate.main(args + ["--kv-cache", "bf16"]) == 0
    assert "x 68 slots, bfloat16" in capsys.readouterr().err
    assert generate.main(args) == 0
    assert "x 68 slots, float32" in capsys.readouterr().err  # default: the compute dtype


def test_chat_int8(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n"))
    assert chat.main(["--checkpoint", str(checkpoint), "--max-new-tokens", "3",
                      "--max-window-size", "64", "--kv-cache", "int8"]) == 0
    err = capsys.readouterr().err
    assert "kv cache: 1 x 67 slots, int8" in err and "[turn 1: " in err


def test_eval_ppl_int8_costs_little(checkpoint, tmp_path, capsys):
    data = tmp_path / "doc.txt"
    data.write_text(TEXT)
    args = ["--checkpoint", str(checkpoint), "--data", str(data), "--lengths", "16,32",
            "--max-windows", "2", "--batch-size", "2"]

    def table(extra):
        assert eval_ppl.main(args + extra) == 0
        row = capsys.readouterr().out.splitlines()[2]
        return [float(c) for c in row.strip("|").split("|")[1:]]

    plain, int8, bf16 = table([]), table(["--kv-cache", "int8"]), table(["--kv-cache", "bf16"])
    assert plain != int8  # quantised keys/values change the forward ...
    assert int8 == pytest.approx(plain, rel=0.02)  # ... a little
    assert bf16 == pytest.approx(plain, rel=0.01)


def test_bad_kv_cache_is_one_line(checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", str(checkpoint), "--prompt", "x", "--kv-cache", "int4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kv-cache" in err
