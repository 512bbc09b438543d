"""Registers the `qwen_jax` model with lm-evaluation-harness, so that the stock command finds
it: `lm_eval --model qwen_jax --model_args checkpoint=DIR --tasks ...`.

lm-eval 0.4 discovers no models of other packages, so `qwen_jax_lm_eval.pth` (installed into
site-packages with the project) imports this module at start-up. It only adds an import hook:
once `lm_eval.models` (which fills lm-eval's model registry with its own lazy entries, and
which lm-eval imports whenever it looks up a model in an empty registry) has run, `qwen_jax` is
added the same way, as a lazy "module:class" entry. Nothing is imported before lm_eval itself
is, and nothing at all in a program that never imports it.
"""

import importlib.abc
import importlib.util
import sys

MODELS = "lm_eval.models"
TARGET = "qwen_jax.evaluate.lm_eval_backend:QwenJaxLM"


def register(_module=None) -> None:
    from lm_eval.api.registry import model_registry as registry

    if "qwen_jax" not in registry:
        registry.register("qwen_jax", target=TARGET)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODELS:
            return None
        sys.meta_path.remove(self)  # one use: find the real module, then step aside
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if MODELS in sys.modules:
        register()
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


install()
