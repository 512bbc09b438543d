"""Shared test set-up: 8 emulated CPU devices and the reference data folders.

The reference folders default to `../shared/reference` beside the project root and can be
pointed elsewhere (a held-out set of the same layout) with environment variables.
"""

import json
import os
import pathlib

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_REFERENCE = PROJECT_ROOT.parent / "shared" / "reference"


def _must_exist(path: pathlib.Path, what: str, env: str) -> pathlib.Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}; put ../shared beside the project root or set {env}")
    return path


@pytest.fixture(scope="session")
def ref_vectors_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("QWEN_REF_VECTORS", SHARED_REFERENCE / "vectors"))
    return _must_exist(path, "reference vectors folder", "QWEN_REF_VECTORS")


@pytest.fixture(scope="session")
def tokenizer_vectors_path() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("QWEN_TOKENIZER_VECTORS",
                                       SHARED_REFERENCE / "tokenizer_vectors.json"))
    return _must_exist(path, "tokenizer vectors file", "QWEN_TOKENIZER_VECTORS")


@pytest.fixture(scope="session")
def tokenizer_vectors(tokenizer_vectors_path) -> dict:
    return json.loads(pathlib.Path(tokenizer_vectors_path).read_text())


@pytest.fixture(scope="session")
def qwen_tiktoken_path() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("QWEN_TIKTOKEN", SHARED_REFERENCE / "qwen.tiktoken"))
    return _must_exist(path, "qwen.tiktoken vocabulary", "QWEN_TIKTOKEN")


@pytest.fixture(scope="session")
def hf_configs_dir() -> pathlib.Path:
    return _must_exist(SHARED_REFERENCE / "hf-configs", "released configs folder", "(none)")


@pytest.fixture(scope="session")
def reward_tiny_run(tmp_path_factory):
    """(workdir, completed process) of `train.py --config configs/reward_tiny.py`, once per
    test process: the reward model tests read it and PPO takes it as its reward model."""
    from runs import train

    workdir = tmp_path_factory.mktemp("reward_tiny") / "run"
    result = train("reward_tiny", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result
