"""The README's model example runs as written."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_model_example_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using the model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["logits"].shape == (2, 1, scope["config"].vocab_size)
    assert int(scope["cache"].index) == 17
