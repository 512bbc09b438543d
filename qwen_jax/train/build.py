"""Everything a training run is built from, checked: the model config (a preset or
`init_from`), the tokenizer, the mesh and batch split, the optimizer, the data iterators.

Everything a user can get wrong (config keys and values, the mesh, the batch split, the data,
the tokenizer, a checkpoint of another model) is checked here, before the work directory is
touched, and reported as one `TrainError`.
"""

from __future__ import annotations

import dataclasses

from qwen_jax.data import pipeline as data_lib
from qwen_jax.data.tokenizer import ByteTokenizer, TokenizerFileError, load_tokenizer
from qwen_jax.io.checkpoint import CheckpointError, load_checkpoint_tokenizer, load_config
from qwen_jax.model import lora
from qwen_jax.model.config import ConfigError, QwenConfig, preset
from qwen_jax.model.transformer import param_shardings
from qwen_jax.parallel import sharding as shd
from qwen_jax.train.optim import OptimizerConfig
from qwen_jax.train.steps import LossConfig, Trainer

_SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
               "kv_channels", "vocab_size")


class TrainError(ValueError):
    """A run that cannot start as configured; the message says which setting and why."""


@dataclasses.dataclass
class Run:
    cfg: object
    model_config: QwenConfig
    trainer: Trainer
    tokenizer: object
    train_data: object
    eval_data: object | None


# ------------------------------------------------------------------------------- building
def lora_fields(cfg) -> dict:
    """config.lora as QwenConfig fields."""
    lo = cfg.lora
    return dict(lora_rank=lo.rank, lora_alpha=float(lo.alpha), lora_dropout=float(lo.dropout),
                lora_targets=tuple(lo.targets), lora_rslora=bool(lo.rslora),
                base_quant=lo.quant, base_quant_group=lo.quant_group)


def model_config(cfg) -> QwenConfig:
    overrides = dict(cfg.model_overrides)
    overrides.update(lora_fields(cfg))
    saved = [m for m in cfg.lora.modules_to_save if m not in lora.SAVED_MODULES]
    if saved or (cfg.lora.modules_to_save and not cfg.lora.rank):
        raise TrainError(f"config.lora.modules_to_save={tuple(cfg.lora.modules_to_save)}: "
                         f"expected names from {tuple(lora.SAVED_MODULES)}, with lora.rank > 0")
    try:
        if cfg.init_from:
            stored = load_config(cfg.init_from)
            wanted = preset(cfg.model) if cfg.model else stored
            if shape_of(stored) != shape_of(wanted):
                raise TrainError(f"init_from={cfg.init_from}: checkpoint is for another model "
                                 f"config: {shape_of(stored)} vs model={cfg.model!r} "
                                 f"{shape_of(wanted)}")
            return stored.replace(**overrides)
        return preset(cfg.model, **overrides)
    except (ConfigError, CheckpointError) as e:
        raise TrainError(str(e)) from None
    except TypeError as e:  # an unknown field in model_overrides
        raise TrainError(f"config.model_overrides: {e}") from None


def shape_of(config: QwenConfig) -> dict:
    return {k: getattr(config, k) for k in _SHAPE_KEYS}


def tokenizer_for(cfg, config: QwenConfig):
    try:
        if cfg.tokenizer == "bytes":
            tok = ByteTokenizer()
        elif cfg.tokenizer or not cfg.init_from:
            tok = load_tokenizer(cfg.tokenizer or None)
        else:
            tok = load_checkpoint_tokenizer(cfg.init_from)
    except (TokenizerFileError, CheckpointError, OSError) as e:
        raise TrainError(f"config.tokenizer: {e}") from None
    if tok.vocab_size > config.vocab_size:
        raise TrainError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's "
                         f"vocab_size is {config.vocab_size}; use a matching tokenizer "
                         "(config.tokenizer) or model")
    return tok


def data_iterator(cfg, tokenizer, global_batch: int, split: str, *, source: str | None = None,
                  kind: str | None = None, what: str = "config.data"):
    """The one global sequence of batches. Every process reads all of it and keeps its
    devices' rows (`qwen_jax.train.task.global_arrays`), so the batches, and the iterator
    state saved with a checkpoint, are the same for any number of processes: 2 processes x 4
    devices train on exactly the batches of 1 x 8, and a run resumes on another process
    count. `source` / `kind` replace config.data's (another stream, e.g. PPO-ptx's, named
    `what` in errors)."""
    d = cfg.data
    if d.loss_mask not in ("assistant", "release"):
        raise TrainError(f"config.data.loss_mask={d.loss_mask!r}: expected 'assistant' or "
                         "'release'")
    if source is None:
        source = d.source if split == "train" else (d.eval_source or d.source)
    sources = [s for s in str(source).split(",") if s]
    config = data_lib.DataConfig(
        source=sources[0] if sources == ["stdlib"] else sources, kind=kind or d.kind,
        seq_len=d.seq_len, batch_size=global_batch, seed=cfg.seed,
        text_field=d.text_field, num_workers=d.num_workers, sft_packing=d.packing,
        loss_mask=d.loss_mask,
        num_epochs=None if split == "train" else 1, shard_index=0, shard_count=1)
    split = "train" if split == "train" or d.eval_source else "validation"
    try:
        return data_lib.make_iterator(config, tokenizer, split=split)
    except data_lib.DataError as e:
        raise TrainError(f"{what} ({split}): {e}") from None


def build_trainer(cfg, mesh=None) -> Trainer:
    """The model config, mesh and Trainer of `cfg`, checked, without data or tokenizer (what a
    compile-only run needs). `mesh` defaults to cfg.mesh over the local devices."""
    config = model_config(cfg)
    if cfg.data.seq_len > config.max_position_embeddings:
        raise TrainError(f"config.data.seq_len={cfg.data.seq_len} exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    if mesh is None:
        try:
            mesh = shd.make_mesh(tuple(cfg.mesh))
        except shd.ShardingError as e:
            raise TrainError(f"config.mesh: {e}") from None
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    gbs, micro = cfg.global_batch_size, cfg.microbatches
    if micro < 1 or gbs % micro or (gbs // micro) % data_parallel:
        raise TrainError(f"config.global_batch_size={gbs} must split into microbatches={micro}"
                         f" each divisible by the data-parallel size {data_parallel} "
                         f"(data x fsdp of mesh {tuple(mesh.shape.values())})")
    if cfg.nonfinite not in ("stop", "skip"):
        raise TrainError(f"config.nonfinite={cfg.nonfinite!r}: expected 'stop' or 'skip'")
    if cfg.max_nonfinite_skips < 0:
        raise TrainError(f"config.max_nonfinite_skips={cfg.max_nonfinite_skips}: expected >= 0")
    opt = OptimizerConfig(total_steps=cfg.num_train_steps, **dict(cfg.optimizer))
    try:
        opt.validate()
        param_shardings(config, mesh)
    except (ValueError, shd.ShardingError) as e:
        raise TrainError(f"config: {e}") from None
    trainable = (lora.trainable_fn(cfg.lora.modules_to_save) if config.lora_rank else None)
    loss = LossConfig(**dict(cfg.loss))
    try:
        loss.validate()
    except ValueError as e:
        raise TrainError(f"config.{e}") from None
    return Trainer(config, opt, mesh, micro, nonfinite=cfg.nonfinite, loss=loss,
                   trainable=trainable)


def build(cfg) -> Run:
    trainer = build_trainer(cfg)
    config, gbs = trainer.model_config, cfg.global_batch_size
    tokenizer = tokenizer_for(cfg, config)
    train = data_iterator(cfg, tokenizer, gbs, "train")
    evals = None
    if cfg.eval_every_steps > 0 and cfg.eval_steps > 0 and (
            cfg.data.eval_source or cfg.data.source == "stdlib"):
        evals = data_iterator(cfg, tokenizer, gbs, "eval")
    return Run(cfg, config, trainer, tokenizer, train, evals)
