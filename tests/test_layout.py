"""The package's shape: imports point one way, from the stages down to the model.

Every `import` and `from ... import` of a qwen_jax module is read from the source (function-
local imports included), so a cycle hidden behind a lazy import is found too.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "qwen_jax"

# Rank of each part: a module may import its own part and parts of a lower rank only.
RANKS = {
    "parallel": 0,   # mesh and logical-axis rules: imports no other part
    "kernels": 0,    # Pallas kernels
    "model": 1,      # config, layers, attention, KV cache, the decoder
    "data": 1,       # tokenizer, chat format, sources, grain pipelines
    "io": 2,         # parameter checkpoints, Hugging Face conversion, the PyTorch reference
    "train": 3,      # optimizer, steps, run loop, train checkpoints, compile-only checks
    "cli": 3,        # what every command line shares
    "infer": 4,      # sampling, generation, chat, perplexity
    "align": 5,      # reward model, PPO, DPO
    "sandbox": 0,    # running model-written code in bubblewrap: imports no other part
    "evaluate": 5,   # the evaluation engine, the lm-eval backend, the release's protocols
    "serve": 6,      # the OpenAI-compatible server: tool prompts, and the sampler of infer/
    "__init__": 9,   # the public surface re-exports from everywhere
    "__main__": 9,   # `python -m qwen_jax.<cli>` entry modules
}
ENTRY_MODULES = {"generate", "chat", "eval_ppl"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: pathlib.Path, modules) -> set[str]:
    """qwen_jax modules that `path` imports (a `from pkg import name` of a submodule counts
    as importing the submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = module_name(path)
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "qwen_jax")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qwen_jax":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != own}


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if len(parts) == 2 and parts[1] in ENTRY_MODULES:
        return "__main__"
    return parts[1]


@pytest.fixture(scope="module")
def graph():
    modules = all_modules()
    return {m: imports_of(p, modules) for m, p in modules.items()}


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_sees_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_down(graph):
    every_part = {part_of(m) for m in graph}
    assert every_part <= set(RANKS), f"parts without a rank: {every_part - set(RANKS)}"
    wrong = [f"{m} ({part_of(m)}) imports {d} ({part_of(d)})"
             for m, deps in graph.items() for d in deps
             if part_of(d) != part_of(m) and RANKS[part_of(d)] >= RANKS[part_of(m)]]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_model_imports_no_stage(graph):
    """The decoder never reaches into training, I/O, data or inference code."""
    for module, deps in graph.items():
        if part_of(module) in ("model", "parallel", "kernels"):
            assert {part_of(d) for d in deps} <= {"model", "parallel", "kernels"}, (module, deps)


def test_modules_stay_small():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"


def test_import_reader_resolves_submodules():
    modules = {"qwen_jax.model", "qwen_jax.model.config", "qwen_jax.io.checkpoint", "qwen_jax.io"}
    src = PACKAGE / "io" / "checkpoint.py"
    deps = imports_of(src, modules)
    assert "qwen_jax.model.config" in deps


def test_every_subpackage_is_packaged():
    """A non-editable install carries every subpackage (pyproject's find rule)."""
    import tomllib

    import setuptools

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    rule = project["tool"]["setuptools"]["packages"]["find"]
    found = set(setuptools.find_packages(str(PACKAGE.parent), include=rule["include"]))
    on_disk = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= found, on_disk - found
