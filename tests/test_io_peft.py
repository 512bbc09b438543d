"""PEFT LoRA adapters (qwen_jax.io.peft, `convert_hf.py export --adapter` and
`import-adapter`): the names, shapes and orientation real PEFT gives the same adapters, in both
layouts; PEFT with our Qwen2 adapter on the exported base computes the merged export's and our
logits; PEFT merging our v1 adapter gives our merged v1 export; export -> import -> export is
bit-exact; bad input is one error line and writes nothing."""

import contextlib
import io
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

import convert_hf
from qwen_jax.io.checkpoint import load_lora_params, load_params, save_checkpoint
from qwen_jax.io.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qwen_jax.io.qwen2 import qwen2_config
from qwen_jax.model import lora
from qwen_jax.model.config import preset
from qwen_jax.model.transformer import Qwen, abstract_params, init_params

import runs
from runs import one_error_line

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TOKENS = np.random.default_rng(0).integers(0, 512, (2, 80))


def run_main(*args):
    """(exit status, stdout, stderr) of convert_hf.main in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = convert_hf.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def ok(*args):
    code, stdout, stderr = run_main(*args)
    assert code == 0, stderr
    return stdout


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 20-step tiny run (the base) and a 20-step LoRA run from it that also trains wte and
    lm_head; their adapters, the base's Qwen2 export and the LoRA run's merged exports (made
    once per test session)."""
    steps = ["--config.num_train_steps=20", "--config.checkpoint_every_steps=20",
             "--config.eval_every_steps=0"]
    exports = {"v1": ("run", "--adapter"), "q2": ("run", "--adapter", "--format", "qwen2"),
               "base_q2": ("base", "--format", "qwen2"), "merged_q2": ("run", "--format", "qwen2"),
               "base_v1": ("base",), "merged_v1": ("run",)}

    def make(root):
        base, run = root / "base", root / "lora"
        result = runs.train("tiny", base, *steps)
        assert result.returncode == 0, result.stderr[-3000:]
        result = runs.train("lora_tiny", run, *steps, f"--config.init_from={base}",
                            "--config.lora.modules_to_save=('wte','lm_head')")
        assert result.returncode == 0, result.stderr[-3000:]
        for name, (source, *flags) in exports.items():
            ok("export", base if source == "base" else run, root / name, *flags)

    root = runs.shared_by_workers(tmp_path_factory, "peft_lora", make)
    return {"root": root, "base": root / "base", "run": root / "lora",
            **{name: root / name for name in exports}}


def test_the_run_trained_its_adapters(lora_run):
    params, config = load_lora_params(lora_run["run"])
    assert config.lora_rank == 8 and lora.has_adapters(params)
    for key, value in flat(params).items():
        if key.endswith(lora.LORA_B):
            assert np.abs(value).max() > 1e-3, key  # B moved off 0: the adapters matter


# ----------------------------------------------------------------------- names and shapes
class _Norm(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(h))


def _module(**children):
    m = torch.nn.Module()
    for k, v in children.items():
        setattr(m, k, v)
    return m


def v1_tree(config):
    """A torch module tree with the Qwen v1 release's module names (no forward)."""
    h, f, v, nn = config.hidden_size, config.mlp_width, config.vocab_size, torch.nn
    blocks = nn.ModuleList([_module(
        ln_1=_Norm(h), ln_2=_Norm(h),
        attn=_module(c_attn=nn.Linear(h, 3 * h), c_proj=nn.Linear(h, h, bias=False)),
        mlp=_module(w1=nn.Linear(h, f, bias=False), w2=nn.Linear(h, f, bias=False),
                    c_proj=nn.Linear(f, h, bias=False)))
        for _ in range(config.num_hidden_layers)])
    model = _module(transformer=_module(wte=nn.Embedding(v, h), h=blocks, ln_f=_Norm(h)),
                    lm_head=nn.Linear(h, v, bias=False))
    model.prepare_inputs_for_generation = None  # what PeftModelForCausalLM looks up
    return model


def qwen2_model(config):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**qwen2_config(config)))


def file_shapes(adapter_dir):
    tensors = safetensors_numpy.load_file(str(pathlib.Path(adapter_dir) / ADAPTER_WEIGHTS))
    return {k: tuple(v.shape) for k, v in tensors.items()}


def assert_peft_names(adapter_dir, model):
    """PEFT, given our adapter_config.json, puts adapters (and modules_to_save) on exactly the
    modules our file has, with the same [out, in] shapes."""
    config = peft.LoraConfig.from_pretrained(str(adapter_dir))
    config.task_type = None  # a plain PeftModel works on any module tree
    state = peft.get_peft_model_state_dict(peft.get_peft_model(model, config))
    assert {k: tuple(v.shape) for k, v in state.items()} == file_shapes(adapter_dir)


def test_names_and_shapes_are_peft_s(lora_run):
    _, config = load_lora_params(lora_run["run"])
    assert_peft_names(lora_run["q2"], qwen2_model(config))
    assert_peft_names(lora_run["v1"], v1_tree(config))
    shapes = file_shapes(lora_run["q2"])
    assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] == (8, 128)
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"] == (128, 8)
    assert shapes["base_model.model.model.embed_tokens.weight"] == (512, 128)
    assert file_shapes(lora_run["v1"])[
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == (384, 8)
    for layout, names in [("v1", ["wte", "lm_head"]), ("q2", ["embed_tokens", "lm_head"])]:
        cfg = json.loads((lora_run[layout] / ADAPTER_CONFIG).read_text())
        assert cfg["modules_to_save"] == names
        assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora",
                                    "lora_dropout", "bias", "base_model_name_or_path")} == {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16.0,
            "use_rslora": False, "lora_dropout": 0.05, "bias": "none",
            "base_model_name_or_path": str(lora_run["base"])}
    assert json.loads((lora_run["v1"] / ADAPTER_CONFIG).read_text())["target_modules"] == [
        "c_attn", "c_proj", "w1", "w2"]


@pytest.fixture(scope="module")
def partial_checkpoints(tmp_path_factory):
    """LoRA checkpoints (not runs) with some targets only, random B: rsLoRA on one c_proj and
    w2, and Q-LoRA (nf4) on the other c_proj and w1."""
    root = tmp_path_factory.mktemp("partial")
    out = {}
    for name, fields in [
            ("rslora", dict(lora_rank=4, lora_alpha=8.0, lora_rslora=True,
                            lora_targets=("attn.c_proj", "w2"))),
            ("qlora", dict(lora_rank=4, base_quant="nf4", base_quant_group=32,
                           lora_targets=("mlp.c_proj", "w1")))]:
        config = preset("tiny", **fields)
        params = init_params(config, jax.random.PRNGKey(0))
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.1 if path[-1].key == lora.LORA_B else x, params)
        out[name] = (save_checkpoint(root / name, params, config), config)
    return out


@pytest.mark.parametrize("name", ["rslora", "qlora"])
@pytest.mark.parametrize("layout", ["qwen", "qwen2"])
def test_some_targets_only(partial_checkpoints, name, layout, tmp_path):
    ckpt, config = partial_checkpoints[name]
    stdout = ok("export", ckpt, tmp_path / "a", "--adapter", "--format", layout)
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    want = {("rslora", "qwen"): ["attn.c_proj", "w2"], ("rslora", "qwen2"): ["o_proj", "gate_proj"],
            ("qlora", "qwen"): ["w1", "mlp.c_proj"], ("qlora", "qwen2"): ["up_proj", "down_proj"]}
    assert cfg["target_modules"] == want[name, layout]
    assert cfg["use_rslora"] == (name == "rslora") and cfg["modules_to_save"] is None
    assert ("trained against the nf4-quantised base" in stdout) == (name == "qlora")
    base = config.replace(lora_rank=0, base_quant="none")
    assert_peft_names(tmp_path / "a", qwen2_model(base) if layout == "qwen2" else v1_tree(base))
    # the adapters are the checkpoint's, bit for bit
    ours = flat(load_lora_params(ckpt)[0])
    tensors = safetensors_numpy.load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    key = ("base_model.model." + ("transformer.h.1.mlp.w2" if layout == "qwen" else
                                  "model.layers.1.mlp.gate_proj")) if name == "rslora" else (
        "base_model.model." + ("transformer.h.1.mlp.c_proj" if layout == "qwen" else
                               "model.layers.1.mlp.down_proj"))
    module = "gate" if name == "rslora" else "down"
    np.testing.assert_array_equal(tensors[key + ".lora_A.weight"],
                                  ours[f"layers/mlp/{module}/lora/lora_a"][1].T)
    np.testing.assert_array_equal(tensors[key + ".lora_B.weight"],
                                  ours[f"layers/mlp/{module}/lora/lora_b"][1].T)


# ----------------------------------------------------------------------- PEFT computes it
def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(TOKENS), use_cache=False).logits.float().numpy()


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager").eval()


def test_peft_on_the_base_gives_the_merged_logits(lora_run):
    base = load_hf(lora_run["base_q2"])
    base_logits = torch_logits(base)
    adapted = torch_logits(peft.PeftModel.from_pretrained(base, str(lora_run["q2"])).eval())
    merged = torch_logits(load_hf(lora_run["merged_q2"]))
    params, config = load_params(lora_run["run"])
    config = config.replace(use_dynamic_ntk=False, use_logn_attn=False, dtype="float32",
                            matmul_precision="highest", attention_impl="xla")
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(Qwen(config).apply({"params": params}, TOKENS.astype(np.int32))[0])
    d_merged = np.abs(adapted - merged).max()
    d_ours = np.abs(adapted - ours).max()
    print(f"PEFT(base + adapter) vs merged qwen2 export: max abs logit diff {d_merged:.2e}; "
          f"vs ours {d_ours:.2e} ({TOKENS.size} tokens)")
    assert d_merged <= 1e-4 and d_ours <= 1e-4
    assert np.abs(adapted - base_logits).max() > 0.1  # the adapter (and wte, lm_head) matter


def test_peft_merges_the_v1_adapter_into_our_merged_v1_export(lora_run):
    _, config = load_lora_params(lora_run["run"])
    model = v1_tree(config.replace(lora_rank=0))
    base = safetensors_numpy.load_file(str(lora_run["base_v1"] / "model.safetensors"))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()}, strict=True)
    merged = peft.PeftModel.from_pretrained(model, str(lora_run["v1"])).merge_and_unload()
    got = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    want = safetensors_numpy.load_file(str(lora_run["merged_v1"] / "model.safetensors"))
    assert set(got) == set(want)
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    print(f"PEFT merge_and_unload of the v1 adapter vs our merged v1 export: {diff:.2e}")
    assert diff <= 1e-6


# ----------------------------------------------------------------------- round trip
@pytest.mark.parametrize("layout", ["qwen", "qwen2"])
def test_export_import_export_is_bit_exact(lora_run, layout, tmp_path):
    adapter = lora_run["v1" if layout == "qwen" else "q2"]
    stdout = ok("import-adapter", adapter, lora_run["base"], tmp_path / "ckpt")
    assert f"({layout} layout)" in stdout
    ok("export", tmp_path / "ckpt", tmp_path / "again", "--adapter", "--format", layout)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        assert (tmp_path / "again" / name).read_bytes() == (adapter / name).read_bytes(), name
    # the imported checkpoint holds the run's adapters and trained modules bit for bit ...
    run_params, run_config = load_lora_params(lora_run["run"])
    imported, config = load_lora_params(tmp_path / "ckpt")
    assert flat(imported).keys() == flat(run_params).keys()
    for key, value in flat(run_params).items():
        np.testing.assert_array_equal(flat(imported)[key], value, err_msg=key)
    # the same model and LoRA (base_quant_group, unused without base_quant, is the base's)
    assert config.replace(base_quant_group=run_config.base_quant_group) == run_config
    # ... and loads merged as the run does
    merged_run, _ = load_params(lora_run["run"], as_numpy=True)
    merged, plain = load_params(tmp_path / "ckpt", as_numpy=True)
    assert plain.lora_rank == 0
    for key, value in flat(merged_run).items():
        np.testing.assert_array_equal(flat(merged)[key], value, err_msg=key)


# ----------------------------------------------------------------------- bad input
def _rewrite(src, dst, config_changes=None, tensors_fn=None, drop=()):
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / ADAPTER_CONFIG).read_text())
        cfg.update(config_changes)
        (dst / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    if tensors_fn:
        tensors = tensors_fn(safetensors_numpy.load_file(str(dst / ADAPTER_WEIGHTS)))
        safetensors_numpy.save_file(tensors, str(dst / ADAPTER_WEIGHTS), {"format": "pt"})
    for name in drop:
        (dst / name).unlink()
    return dst


def _other_k(tensors):
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    tensors[key] = tensors[key] + 1e-3
    return tensors


def _another_model_base(root):
    config = preset("tiny", num_attention_heads=2, hidden_size=64)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(config))
    return save_checkpoint(root / "other_base", params, config)


@pytest.mark.parametrize("case, expected", [
    ("no_dir", ["no such directory"]),
    ("no_weights", ["no adapter_model.safetensors"]),
    ("not_lora", ["peft_type 'IA3'", "only LoRA"]),
    ("rank", ["r=4 in adapter_config.json", "has rank 8"]),
    ("no_such_target", ["target module 'c_fc' does not exist"]),
    ("other_model", ["an adapter for another model", "[8, 128]", "[8, 64]"]),
    ("qkv_differ", ["k_proj.lora_A differs from", "merge_and_unload"]),
])
def test_bad_adapter_gives_one_error_line_and_writes_nothing(lora_run, case, expected,
                                                             tmp_path):
    adapter, base = lora_run["q2"], lora_run["base"]
    if case == "no_dir":
        adapter = tmp_path / "nothing"
    elif case == "no_weights":
        adapter = _rewrite(adapter, tmp_path / "a", drop=[ADAPTER_WEIGHTS])
    elif case == "not_lora":
        adapter = _rewrite(adapter, tmp_path / "a", {"peft_type": "IA3"})
    elif case == "rank":
        adapter = _rewrite(adapter, tmp_path / "a", {"r": 4})
    elif case == "no_such_target":
        adapter = _rewrite(lora_run["v1"], tmp_path / "a",
                           {"target_modules": ["c_attn", "c_proj", "w1", "w2", "c_fc"]})
    elif case == "other_model":
        base = _another_model_base(tmp_path)
    elif case == "qkv_differ":
        adapter = _rewrite(adapter, tmp_path / "a", tensors_fn=_other_k)
    target = tmp_path / "out"
    code, stdout, stderr = run_main("import-adapter", adapter, base, target)
    line = one_error_line(stderr)
    assert code == 1 and stderr.count("\n") == 1, stderr
    for text in expected:
        assert text in line, (text, line)
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_adapter_export_of_a_run_without_lora(lora_run, tmp_path):
    code, _, stderr = run_main("export", lora_run["base"], tmp_path / "out", "--adapter")
    assert code == 1 and "not a LoRA model (lora_rank=0)" in one_error_line(stderr)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_the_command_line(lora_run, tmp_path):
    """The real command line, once: a subprocess exports, and a bad import is one line."""
    result = runs.cli("convert_hf.py", "export", lora_run["run"], tmp_path / "a", "--adapter",
                      "--format", "qwen2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "a" / ADAPTER_WEIGHTS).read_bytes() == (
        lora_run["q2"] / ADAPTER_WEIGHTS).read_bytes()
    result = runs.cli("convert_hf.py", "import-adapter", tmp_path / "missing", lora_run["base"],
                      tmp_path / "out")
    assert result.returncode == 1 and "no such directory" in one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()
