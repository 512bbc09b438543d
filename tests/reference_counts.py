"""Sizes of the reference data known at collection time, for parametrising tests before
fixtures exist (the same environment variables and defaults as the fixtures in conftest.py)."""

import json
import os
import pathlib

SHARED_REFERENCE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def tokenizer_vector_count(key: str) -> int:
    """How many entries `key` of the tokenizer vectors has (for parametrising at collection
    time, before fixtures exist: the same env var as `tokenizer_vectors_path`); 1 when the
    file is missing, so that the single test then fails on the fixture."""
    path = pathlib.Path(os.environ.get("QWEN_TOKENIZER_VECTORS",
                                       SHARED_REFERENCE / "tokenizer_vectors.json"))
    return len(json.loads(path.read_text())[key]) if path.exists() else 1
