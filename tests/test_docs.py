"""Every command written in README.md and docs/*.md works as written (tests/docs_commands.py
says what a command is). Each is checked by the program it starts, where it is written: a
command that breaks fails here with its FILE:LINE.

- `python train.py ...`: train.py's own flag parser reads the flags, loads the config file
  and applies every `--config.` override (in a fresh process, as train.py starts);
- `python -m qwen_jax.X`, `python convert_hf.py`, `python bench/X.py`: the program's own
  `main` parses the arguments with its argparse parser (stopped right after parsing);
- `bash X.sh`: the script exists and `bash -n` reads it;
- the set-up and the test command: `.ci/run` runs the same;
- `curl`: tests/test_serve_server.py sends the documented request to a real server;
- the README's tour runs for real below, on a short run of the demo config, each command as
  written but for the run's length and the server's port.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import re
import runpy
import shlex
import subprocess
import sys
import time

import pytest

import docs_commands
import runs
from docs_commands import ROOT

COMMANDS = docs_commands.commands()
SETUP = {"-m venv", ".", "pip"}  # run by .ci/run (test_ci_runs_the_readme_set_up)


def _ids(commands):
    return [f"{c.where} {c.program}" for c in commands]


def test_the_documents_have_commands():
    """The extraction sees the commands (a broken pattern would pass every check below)."""
    programs = {c.program for c in COMMANDS}
    assert {"train.py", "convert_hf.py", "-m qwen_jax.generate", "-m qwen_jax.serve",
            "-m qwen_jax.eval_ppl", "-m qwen_jax.chat", "-m pytest", "curl"} <= programs
    assert any(c.where.startswith("docs/") for c in COMMANDS)
    known = {"train.py", "convert_hf.py", "curl", "printf", "bash", "-m pytest", *SETUP}
    unknown = [c for c in COMMANDS if c.program not in known
               and not c.program.startswith(("-m qwen_jax.", "bench/"))]
    assert not unknown, f"commands no check below knows how to check: {unknown}"


# ------------------------------------------------------------------------------- train.py
_TRAIN = [c for c in COMMANDS if c.program == "train.py"]

_PARSE_TRAIN = """
import contextlib, io, json, sys
import train
from absl import flags
results = []
for argv in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)  # the overrides: ml_collections defines them per parse
    sys.argv = argv  # ml_collections reads the --config. overrides from sys.argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rest = train.parse_flags(argv)
            flags.FLAGS.config.to_dict()  # as train.main: a config file that failed to load
        results.append(f"unexpected arguments: {rest[1:]}" if rest[1:] else None)
    except (SystemExit, OSError) as e:
        results.append(err.getvalue().strip()[-500:] or str(e)[-500:])
print(json.dumps(results))
"""


def _parse_train(argvs: list[list[str]]) -> list[str | None]:
    """train.py's own flag parser on each argv, in one fresh process (as train.py starts):
    None where it parsed, else what it printed."""
    proc = subprocess.run([sys.executable, "-c", _PARSE_TRAIN,
                           json.dumps([["train.py", *a] for a in argvs])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_commands_parse():
    """All train.py commands: flags, config file, overrides; and the check refuses a misspelt
    config key, an unknown flag and a missing config file, between commands that parse (the
    flags are parsed afresh for each)."""
    bad = [["--config", "configs/tiny.py", "--config.num_train_stepz=3"],
           ["--config", "configs/tiny.py", "--wrokdir", "x"],
           ["--config", "configs/nope.py", "--workdir", "x"]]
    good = [c.args for c in _TRAIN]
    results = _parse_train([*good[:1], *bad, *good])
    assert results[0] is None and all(results[1:1 + len(bad)]), results[:1 + len(bad)]
    failures = [f"{c.where}: {c.text}\n  {r}" for c, r in
                zip(_TRAIN, results[1 + len(bad):], strict=True) if r is not None]
    assert _TRAIN and not failures, "\n".join(failures)


# ------------------------------------------------------------------------------- argparse
class _Parsed(Exception):
    pass


def _parse_only(program: str, args: list[str], monkeypatch) -> str | None:
    """Run `program` (`-m module` or a script path) with `args` until its argparse parser has
    parsed them: None if they parsed, else what the program printed."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [program, *args])
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        try:
            if program.startswith("-m "):
                runpy.run_module(program[3:], run_name="__main__", alter_sys=False)
            else:
                monkeypatch.syspath_prepend(str((ROOT / program).parent))
                runpy.run_path(str(ROOT / program), run_name="__main__")
        except _Parsed:
            return None
        except SystemExit as e:
            return f"exit {e.code}: {out.getvalue().strip()[-500:]}"
    return "the program ended without parsing its arguments"


_ARGPARSE = [c for c in COMMANDS if c.program == "convert_hf.py"
             or c.program.startswith(("-m qwen_jax.", "bench/"))]


@pytest.mark.parametrize("command", _ARGPARSE, ids=_ids(_ARGPARSE))
def test_argparse_commands_parse(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    problem = _parse_only(command.program, command.args, monkeypatch)
    assert problem is None, f"{command.where}: {command.text}\n{problem}"


def test_argparse_check_can_fail(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert "--max-new-tokenz" in _parse_only(
        "-m qwen_jax.generate", ["--checkpoint", "d", "--prompt", "x", "--max-new-tokenz", "3"],
        monkeypatch)
    assert "invalid choice" in _parse_only("convert_hf.py", ["exprot", "a", "b"], monkeypatch)


# ------------------------------------------------------------------------------- the rest
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.program == "bash"],
                         ids=_ids([c for c in COMMANDS if c.program == "bash"]))
def test_shell_scripts_exist_and_read(command):
    script = ROOT / command.args[0]
    assert script.is_file(), f"{command.where}: no {script}"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{command.where}: {proc.stderr}"


def test_ci_runs_the_readme_set_up_and_tests():
    """The README's set-up and test commands are what `.ci/run` runs on a fresh clone."""
    ci = [shlex.split(line.split("||")[0]) for line in
          (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    readme = [c for c in COMMANDS if c.where.startswith("README.md")]
    pip = [c.args for c in readme if c.program == "pip"]
    assert pip == [["install", "torch==2.13.0"], ["install", "-e", ".[test]"]]
    ci_pip = [[a for a in line[3:] if a != "-q"] for line in ci
              if line[:4] == ["python", "-m", "pip", "install"] and "--upgrade" not in line]
    assert ci_pip == pip
    sandbox = [list(c.argv) for c in readme if c.program == "-m qwen_jax.sandbox"]
    assert sandbox == [["python", "-m", "qwen_jax.sandbox", "--install"]]
    assert [line for line in ci if line[:3] == ["python", "-m", "qwen_jax.sandbox"]] == sandbox
    tests = [list(c.argv) for c in docs_commands.section(ROOT / "README.md", "## Tests")
             if c.program == "-m pytest"]
    assert tests == [["python", "-m", "pytest", "-q", "-n", "2"]]
    assert [line for line in ci if line[:3] == ["python", "-m", "pytest"]] == tests


def test_pytest_commands_name_tests_that_exist():
    """`python -m pytest FILE[::TEST] [-k EXPR]`, as the documents cite a measurement: the file
    exists and, where the command names one, the test (or the -k expression's words) is in it."""
    for c in (c for c in COMMANDS if c.program == "-m pytest"):
        args, k = list(c.args), None
        if "-k" in args:
            k = args.pop(args.index("-k") + 1)
        if "-n" in args:
            args.pop(args.index("-n") + 1)
        paths = [a for a in args if not a.startswith("-")]
        for path in paths:
            file, _, test = path.partition("::")
            assert (ROOT / file).is_file(), f"{c.where}: no {file}"
            source = (ROOT / file).read_text()
            assert not test or f"def {test.split('[')[0]}(" in source, f"{c.where}: no {test}"
            words = re.findall(r"\w+", k or "")
            assert all(w in source for w in words if w not in ("and", "or", "not")), \
                f"{c.where}: -k {k} selects nothing in {file}"


def test_links_between_documents_resolve():
    """Every relative link in README.md and docs/ names a file that exists."""
    broken = []
    for path in docs_commands.DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if not target.startswith(("http://", "https://", "#")) and \
                    not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_python_examples_run():
    """The Python examples that run as written (models.md's API example)."""
    text = (ROOT / "docs" / "models.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("## The Python API", 1)[1],
                     re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/models.md", "exec"), scope)
    assert scope["logits"].shape == (2, 1, scope["config"].vocab_size)
    assert int(scope["cache"].index) == 17


# ------------------------------------------------------------------------------- the tour
def _as_written(command, tmp, *extra):
    """The arguments after `python` of a documented command run from the project root, its
    runs/ and exported/ folders under `tmp`, with `extra` arguments appended."""
    argv = [a.replace("runs/", f"{tmp}/runs/").replace("exported/", f"{tmp}/exported/")
            for a in command.argv]
    assert argv[0] in ("python", "python3"), command.text
    return [*argv[1:], *extra]


@pytest.mark.slow
def test_the_readme_demo_and_tour(tmp_path):
    """The README's main command (30 steps instead of its full length, a higher learning
    rate) trains and prints the sampling command; then the tour's commands on that run, as
    written but for the LoRA run's length and the perplexity's windows: sample, perplexity
    past the trained length, LoRA, export to the Qwen2 layout (which transformers loads,
    with our logits), and the server answering the openai client. Over 30 s: five commands
    in fresh processes, each a user's first contact with the project."""
    import httpx
    import numpy as np
    import openai
    import torch
    import transformers

    from qwen_jax.io.checkpoint import load_params
    from qwen_jax.model.transformer import Qwen

    demo = docs_commands.find("train.py", "configs/tiny.py", "--workdir runs/tiny",
                              documents=[ROOT / "README.md"])
    workdir = tmp_path / "runs" / "tiny"
    result = runs.cli(*_as_written(demo, tmp_path, "--config.num_train_steps=30",
                              "--config.eval_every_steps=15", "--config.log_every_steps=5",
                              "--config.optimizer.warmup_steps=5",
                              "--config.optimizer.peak_learning_rate=3e-3"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == 30
    assert summary["last_logged_loss"] < summary["first_logged_loss"] - 1.0
    assert f"python -m qwen_jax.generate --checkpoint {workdir}" in result.stdout

    tour = [c for c in docs_commands.section(ROOT / "README.md", "## A tour")
            if "runs/" in c.text]  # the rest needs released weights or compiles for minutes
    programs = [c.program for c in tour]
    assert programs == ["-m qwen_jax.generate", "-m qwen_jax.eval_ppl", "train.py",
                        "convert_hf.py", "-m qwen_jax.serve"], programs
    generate, ppl, lora, export, serve = tour

    result = runs.cli(*_as_written(generate, tmp_path))
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-3000:]
    result = runs.cli(*_as_written(ppl, tmp_path, "--max-windows", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    lengths = ppl.args[ppl.args.index("--lengths") + 1].split(",")
    assert all(f"| {n} " in result.stdout or n in result.stdout for n in lengths)
    result = runs.cli(*_as_written(lora, tmp_path, "--config.num_train_steps=5",
                              "--config.eval_every_steps=0",
                              "--config.checkpoint_every_steps=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = runs.cli(*_as_written(export, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]

    exported = pathlib.Path(_as_written(export, tmp_path)[3])
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32)
    params, config = load_params(tmp_path / "runs" / "lora_tiny")
    config = config.replace(use_dynamic_ntk=False, use_logn_attn=False)
    tokens = np.arange(3, 40, dtype=np.int64)[None]
    ours = np.asarray(Qwen(config).apply({"params": params}, tokens.astype(np.int32))[0])
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)

    argv = [sys.executable, *_as_written(serve, tmp_path)]
    port = str(runs.free_port())
    argv[argv.index("--port") + 1] = port
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(argv, cwd=ROOT, env=runs.env(), stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(960):  # up to 240 s: the warm-up compiles
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            raise AssertionError(log.read_text()[-3000:])
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
        reply = client.completions.create(model="lora_tiny", prompt="def ", max_tokens=8,
                                          temperature=0)
        assert reply.choices[0].text and reply.usage.completion_tokens <= 8
    finally:
        server.kill()
        server.wait(timeout=30)

