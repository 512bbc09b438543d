"""Shared test set-up: 8 emulated CPU devices, one persistent compilation cache for the whole
session, and the reference data folders.

The compilation cache is a temporary folder made by the first process of the session (the
xdist controller, or the only process) and removed by it at the end. The xdist workers and every
subprocess the tests start (train.py, the server, multi-process jobs, compile-only runs) inherit
it through the environment, so a program compiled once is loaded, not compiled, by the next
process that needs it. It is never the user's own cache: a JAX_COMPILATION_CACHE_DIR set outside
the tests is replaced for the session.

The reference folders default to `../shared/reference` beside the project root and can be
pointed elsewhere (a held-out set of the same layout) with environment variables.
"""

import atexit
import json
import os
import pathlib
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

_CACHE_ENV = "QWEN_JAX_TEST_COMPILATION_CACHE"
if _CACHE_ENV not in os.environ:  # the session's first process: make the folder, own it
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="qwen_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
# Every program, however quick to compile: the tests' programs are small and compiled again
# and again, by many processes.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# The pytest processes themselves compile hundreds of small programs, each run a few times:
# LLVM's optimisation of the generated CPU code costs more than it saves there (test_slots.py:
# 125 s -> 84 s). The same programs, the same HLO passes; only the machine code is less
# optimised. Every subprocess the tests start (train.py, the server, compile-only runs)
# compiles as a user's does: the flag is taken out of the environment again once this
# process's backend has read it.
_SUBPROCESS_XLA_FLAGS = os.environ["XLA_FLAGS"]
os.environ["XLA_FLAGS"] = _SUBPROCESS_XLA_FLAGS + " --xla_backend_optimization_level=0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.devices()  # initialises the CPU backend, which reads XLA_FLAGS once
os.environ["XLA_FLAGS"] = _SUBPROCESS_XLA_FLAGS
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
    test session: the reward model tests read it and PPO takes it as its reward model."""
    from runs import shared_train

    return shared_train(tmp_path_factory, "reward_tiny", "reward_tiny")
