"""Run configuration: load a run YAML, apply command-line overrides, validate it all up front.

A run YAML (``configs/<model>/train.yaml``) holds the keys of the original toolkit::

    imports: []                       # modules to import first (models/losses/runners of yours)
    model_name: GPT2MEG
    model_config: model.yaml          # path (relative to this file) or an inline mapping
    loss_name: CrossEntropy           # default: the model's registered default loss
    loss: {label_smoothing: 0.0}
    dataset_name: omega               # omega | chunks | libribrain
    datasplitter: {dataset_root: ../../runs/demo/preprocessed/chunks, ...}
    dataloader: {batch_size: 8, num_workers: 0, mixup: null}
    lightning: {lr: 3.0e-4, warmup_steps: 100, compile: false}
    trainer: {max_epochs: 5, precision: bf16-mixed}   # lightning.Trainer arguments
    save_dir: ../../runs/gpt2meg      # train refuses a save_dir holding another run
    resume_from: null                 # a .ckpt path, or "last"
    overwrite: false                  # replace the run in save_dir (or: train --overwrite)
    resplit: false                    # ignore save_dir/split.json (or: --resplit)
    checkpoint: {every_n_train_steps: null}
    augmentations: null               # path to a YAML list, or an inline list
    seed: 42
    eval_class: EvalQuant
    eval: {...}                       # options of the eval runner

:func:`load_config` checks everything before any work starts (DESIGN.md, contract 4): unknown
keys (with a close-match hint), wrong types, missing files, unknown model/loss/eval names,
``model_config`` against the model's ``config_class``, ``datasplitter`` against the split
function's signature, ``trainer`` against ``lightning.Trainer``, the model's input kind against
the dataset's, and the ``eval`` block against the eval runner's options. Each problem is one
:class:`ConfigError` naming the file, the key path, what is allowed and what was given.

Relative paths in a YAML file resolve against that file's folder; relative paths given as
command-line overrides resolve against the current working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ephys_gpt.configfile import (
    ConfigError,
    ConfigFileNotFoundError,
    ConfigTypeError,
    describe,
    dump_yaml,
    format_validation_error,
    get_path,
    parse_override,
    read_yaml,
    resolve_path,
    set_path,
    unknown_key_message,
)
from ephys_gpt.registry import EVAL_RUNNERS, import_plugins

MODES = ("train", "test", "eval")

#: Trainer arguments that ExperimentDL sets itself (loggers, checkpointing, output folder).
MANAGED_TRAINER_KEYS = {
    "logger": "CSV and TensorBoard loggers are created under save_dir/logs",
    "callbacks": "checkpoint and learning-rate callbacks are created by ExperimentDL",
    "default_root_dir": "outputs go to save_dir",
    "enable_checkpointing": "best/last checkpoints are always written to save_dir/checkpoints",
    "plugins": "plugins are Python objects and cannot come from YAML",
    "profiler": "set trainer.profiler from Python; YAML strings are not checked here",
    "use_distributed_sampler": "ephys-gpt shards the data over the ranks itself, respecting "
                               "dataloader.shuffle and keeping resume exact",
}


#: One-off switches of a command, never written to a run's config.yaml (a saved config run
#: again must not overwrite or re-split the run it describes).
ONE_OFF_KEYS = ("overwrite", "resplit")


def dump_config(config: dict, path: str | os.PathLike) -> Path:
    """Write ``config`` as YAML to ``path`` atomically (one-off switches reset to false)."""
    return dump_yaml({**config, **{k: False for k in ONE_OFF_KEYS if k in config}}, path)


# --------------------------------------------------------------------------------------------
# Schema of the run YAML
# --------------------------------------------------------------------------------------------

class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


class MixupConfig(_Block):
    """``dataloader.mixup``: batches mixed with weights drawn from Beta(alpha, alpha)."""

    alpha: float = Field(0.2, gt=0, description="Beta distribution parameter")
    quantize_bits: int | None = Field(None, description="mu-law quantize the mixed signal "
                                      "on the fly (continuous datasets feeding token models)")
    quantize_scale: float = Field(1.0, gt=0, description="signal scale before mu-law")
    num_classes: int | None = Field(None, ge=2, description="soft-label classes for labelled "
                                    "datasets (default: the dataset's num_classes)")


class DataLoaderConfig(_Block):
    """``dataloader``: torch DataLoader arguments (shared by train, val and test loaders)."""

    batch_size: int = Field(8, ge=1)
    eval_batch_size: int | None = Field(None, ge=1, description="val/test batch size "
                                        "(default: batch_size)")
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False
    persistent_workers: bool = Field(False, description="only used when num_workers > 0")
    prefetch_factor: int | None = Field(None, ge=1, description="only with num_workers > 0")
    drop_last: bool = Field(False, description="drop the last incomplete training batch")
    shuffle: bool = Field(True, description="shuffle the training set each epoch")
    mixup: MixupConfig | None = None


class LightningConfig(_Block):
    """``lightning``: optimizer, schedule and compilation options of :class:`LitModel`."""

    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay; never "
                                "applied to biases, norms and embeddings")
    betas: list[float] = Field([0.9, 0.95], min_length=2, max_length=2)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["cosine", "constant"] = Field(
        "cosine", description="after warmup: cosine decay to min_lr_ratio*lr, or constant")
    warmup_steps: int = Field(100, ge=0, description="linear warmup length in optimizer steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    total_steps: int | None = Field(None, ge=1, description="length of the schedule in "
                                    "optimizer steps (default: Trainer's estimate)")
    compile: bool = Field(False, description="torch.compile the model")
    metrics_top_k: int = Field(5, ge=1, description="k of the logged top-k accuracy")


class CheckpointConfig(_Block):
    """``checkpoint``: when resumable checkpoints are written besides best/last per validation."""

    every_n_train_steps: int | None = Field(
        None, ge=1, description="also write checkpoints/last.ckpt every this many optimizer "
        "steps, mid-epoch included (resuming from it is exact); null: only at validation / "
        "epoch end")


class RunConfig(_Block):
    """The whole run YAML (after ``model_config``/``augmentations`` files are read)."""

    imports: list[str] = Field(default_factory=list, description="Python modules imported "
                               "before names are resolved: a model family, loss or eval "
                               "runner of your own registers itself there")
    model_name: str
    model_cfg: dict = Field(default_factory=dict, alias="model_config")
    loss_name: str | None = None
    loss: dict = Field(default_factory=dict)
    dataset_name: str = "omega"
    datasplitter: dict = Field(default_factory=dict)
    dataloader: DataLoaderConfig = Field(default_factory=DataLoaderConfig)
    lightning: LightningConfig = Field(default_factory=LightningConfig)
    trainer: dict = Field(default_factory=dict)
    save_dir: str
    resume_from: str | None = None
    overwrite: bool = Field(False, description="train: replace the run already in save_dir "
                            "(deletes only the files ephys-gpt wrote there); not saved in "
                            "save_dir/config.yaml")
    resplit: bool = Field(False, description="draw the split from datasplitter even though "
                          "save_dir/split.json recorded one; not saved in config.yaml")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    augmentations: list | dict | None = None
    seed: int = 42
    eval_class: str = "EvalQuant"
    eval: dict | None = None


# --------------------------------------------------------------------------------------------
# Overrides and paths
# --------------------------------------------------------------------------------------------

def _path_keys(cfg: dict) -> list[tuple[str, ...]]:
    """Key paths holding file-system paths (resolved against the config file's folder)."""
    keys = [("save_dir",), ("datasplitter", "dataset_root"), ("datasplitter", "data_path"),
            ("eval", "ckpt_path")]
    if isinstance(cfg.get("model_config"), str):
        keys.append(("model_config",))
    elif isinstance(cfg.get("model_config"), dict) and "tokenizer_path" in cfg["model_config"]:
        keys.append(("model_config", "tokenizer_path"))  # a prior's exported tokenizer
    if isinstance(cfg.get("augmentations"), str):
        keys.append(("augmentations",))
    if cfg.get("resume_from") not in (None, "last"):
        keys.append(("resume_from",))
    return keys


def _resolve_paths(cfg: dict, base: Path, only: set[tuple[str, ...]] | None = None) -> None:
    for keys in _path_keys(cfg):
        if only is not None and keys not in only:
            continue
        value = get_path(cfg, keys)
        if isinstance(value, str) and value:
            set_path(cfg, keys, resolve_path(value, base), ".".join(keys))


def _load_model_config(cfg: dict, source: str) -> None:
    value = cfg.get("model_config")
    if isinstance(value, str):
        data = read_yaml(value, "model_config")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigTypeError(f"model_config file {value} should hold a mapping of model "
                                  f"arguments, found {type(data).__name__}")
        if isinstance(data.get("tokenizer_path"), str) and data["tokenizer_path"]:
            # relative to the model YAML that names it
            data["tokenizer_path"] = resolve_path(data["tokenizer_path"], Path(value).parent)
        cfg["model_config"] = data
    elif value is not None and not isinstance(value, dict):
        raise ConfigTypeError(f"{source}: key 'model_config' should be a path to a model YAML "
                              f"or a mapping, got {describe(value)}")


def _load_augmentations(cfg: dict, source: str) -> None:
    value = cfg.get("augmentations")
    if isinstance(value, str):
        data = read_yaml(value, "augmentations")
        if isinstance(data, dict) and set(data) == {"augmentations"}:
            data = data["augmentations"]
        if data is not None and not isinstance(data, (list, dict)):
            raise ConfigTypeError(f"augmentations file {value} should hold a list or a mapping "
                                  f"of augmentations, found {type(data).__name__}")
        cfg["augmentations"] = data
    elif value is not None and not isinstance(value, (list, dict)):
        raise ConfigTypeError(f"{source}: key 'augmentations' should be a path to a YAML file, "
                              f"a list or a mapping, got {describe(value)}")


# --------------------------------------------------------------------------------------------
# Cross-checks against the registries, the dataset splitter, Lightning and eval runners
# --------------------------------------------------------------------------------------------

def _check_model_config(spec, model_cfg: dict) -> None:
    cls = spec.config_class
    if cls is None:
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in model_cfg:
        if key not in fields:
            raise ConfigError(unknown_key_message(f"model_config.{key}", key, fields) +
                              f" (the arguments of {spec.name})")
    try:
        adapter = TypeAdapter(cls)
    except Exception:  # annotations pydantic cannot express: fall back to constructing it
        adapter = None
    if adapter is not None:
        try:
            adapter.validate_python(model_cfg)
        except ValidationError as err:
            raise format_validation_error(err, "model_config") from None
    else:
        try:
            cls(**model_cfg)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model_config for {spec.name}: {err}") from None


def _check_callable_kwargs(fn, kwargs: dict, where: str, skip: Iterable[str] = ()) -> None:
    sig = inspect.signature(fn)
    params = {n: p for n, p in sig.parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in ("self", *skip)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    if not takes_any:
        for key in kwargs:
            if key not in params:
                raise ConfigError(unknown_key_message(f"{where}.{key}", key, params))
    for n, p in params.items():
        if p.default is p.empty and n not in kwargs:
            raise ConfigError(f"required key '{where}.{n}' is missing "
                              f"({getattr(fn, '__qualname__', fn)} needs it)")


def _check_loss_kwargs(loss_spec, kwargs: dict) -> None:
    import torch

    if loss_spec.cls.__init__ is torch.nn.Module.__init__:  # takes no arguments
        if kwargs:
            raise ConfigError(f"key 'loss': loss {loss_spec.name} takes no options, got "
                              f"{sorted(kwargs)}")
        return
    _check_callable_kwargs(loss_spec.cls.__init__, kwargs, "loss")


def _check_trainer(trainer_cfg: dict) -> None:
    import lightning

    params = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}
    for key, value in trainer_cfg.items():
        if key in MANAGED_TRAINER_KEYS:
            raise ConfigError(f"key 'trainer.{key}' cannot be set in the config: "
                              f"{MANAGED_TRAINER_KEYS[key]}")
        if key not in params:
            raise ConfigError(unknown_key_message(f"trainer.{key}", key, params - set(MANAGED_TRAINER_KEYS))
                              + " (lightning.Trainer arguments)")
        if key in ("max_epochs", "min_epochs", "max_steps", "min_steps", "log_every_n_steps",
                   "accumulate_grad_batches", "num_sanity_val_steps", "num_nodes",
                   "check_val_every_n_epoch") and value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigTypeError(f"key 'trainer.{key}' should be an integer, got "
                                      f"{describe(value)}")
        if key in ("gradient_clip_val",) and value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigTypeError(f"key 'trainer.{key}' should be a number, got "
                                      f"{describe(value)}")


def _check_dataset(cfg: dict, spec) -> None:
    from ephys_gpt.dataset import registry as ds

    name = cfg["dataset_name"]
    try:
        splitter = ds.get_splitter(name)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"key 'dataset_name': {err}") from None
    dcfg = cfg["datasplitter"]
    if "sessions" in dcfg:
        raise ConfigError("key 'datasplitter.sessions' cannot be set in the config: a run's "
                          "sessions per split come from its record save_dir/split.json")
    skip = ("augmentations",) if cfg.get("augmentations") is not None else ()
    _check_callable_kwargs(splitter, dcfg, "datasplitter", skip=skip)
    root = dcfg.get("dataset_root")
    # LibriBrain roots may be download targets; chunk stores must exist already.
    if name != "libribrain" and isinstance(root, str) and not Path(root).exists():
        raise ConfigFileNotFoundError(f"key 'datasplitter.dataset_root': {root} does not exist "
                                      "(run `ephys-gpt preprocess` first, or override it with "
                                      "datasplitter.dataset_root=PATH)")
    try:
        kind = ds.dataset_input_kind(name, dcfg)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"key 'datasplitter': {err}") from None
    mixup = cfg["dataloader"].get("mixup") or {}
    if kind == "continuous" and mixup.get("quantize_bits"):
        kind = "tokens"  # MixupDataLoader quantizes the mixed signals to tokens
    if kind != spec.input_kind:
        fitting = sorted(n for n in ds.DATASETS
                         if ds.DATASETS.get(n).input_kind == spec.input_kind)
        hint = (f"; dataset classes yielding {spec.input_kind!r}: {', '.join(fitting)}"
                if fitting else "")
        raise ConfigError(
            f"model {spec.name} consumes {spec.input_kind!r} inputs but the dataset "
            f"(dataset_name={name!r}, datasplitter.dataset_class="
            f"{dcfg.get('dataset_class', '<default>')!r}) yields {kind!r}{hint}")


def _check_eval(cfg: dict, mode: str) -> None:
    block = cfg.get("eval")
    if block is None:
        if mode == "eval":
            raise ConfigError("eval mode needs an 'eval' block (the options of "
                              f"eval_class {cfg['eval_class']!r}, e.g. eval.ckpt_path)")
        return
    try:
        spec = EVAL_RUNNERS.get(cfg["eval_class"])
    except ValueError as err:
        raise ConfigError(f"key 'eval_class': {err}") from None
    opts = spec.options
    if "ckpt_path" in opts.model_fields and not block.get("ckpt_path"):
        block["ckpt_path"] = str(Path(cfg["save_dir"]) / "export")
    if mode == "eval" and block.get("ckpt_path"):
        ckpt = Path(block["ckpt_path"])
        if not ckpt.exists():
            raise ConfigFileNotFoundError(
                f"key 'eval.ckpt_path': {ckpt} does not exist (train first, or point it at an "
                "export folder or a .ckpt file)")
    try:
        opts.model_validate(block)
    except ValidationError as err:
        raise format_validation_error(err, "eval", opts) from None


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike | dict, overrides: Sequence[str] = (), *,
                mode: str = "train") -> dict:
    """Load, override and validate a run configuration; return it as a plain dict.

    Parameters
    ----------
    path : str | PathLike | dict
        The run YAML (relative paths inside resolve against its folder), or an already
        loaded mapping (relative paths then resolve against the working directory).
    overrides : sequence of str
        ``"a.b=value"`` items; values are parsed as YAML. Applied after the file is read and
        after ``model_config`` is loaded from its file, so ``model_config.n_layer=2`` works.
    mode : str
        ``train``, ``test`` or ``eval``; eval mode also requires ``eval.ckpt_path`` to exist.

    Returns
    -------
    dict
        Every key of :class:`RunConfig` with defaults filled in, ``model_config`` and
        ``augmentations`` inlined, ``loss_name`` resolved, and paths absolute. Feeding it
        back to :func:`load_config` gives the same dict.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(path, dict):
        raw, base, source = copy.deepcopy(path), Path.cwd(), "config"
    else:
        cfg_path = Path(path)
        raw = read_yaml(cfg_path, "run config")
        base, source = Path(os.path.abspath(cfg_path)).parent, str(cfg_path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"{source}: expected a mapping of keys at the top level, found "
                              f"{type(raw).__name__}")
    try:
        return _load(raw, base, overrides, mode)
    except ConfigError as err:
        if source != "config" and not str(err).startswith(source):
            raise type(err)(f"{source}: {err}") from None
        raise


def _load(raw: dict, base: Path, overrides: Sequence[str], mode: str) -> dict:
    from ephys_gpt.models import registry

    _resolve_paths(raw, base)
    _load_model_config(raw, "config")
    _load_augmentations(raw, "config")
    cwd = Path.cwd()
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "model_config" and len(keys) > 1 and isinstance(raw.get("model_config"), str):
            _load_model_config(raw, "config")
        set_path(raw, keys, value, text)
        touched = {k for k in _path_keys(raw) if k[:len(keys)] == tuple(keys)}
        if touched:  # the path itself, or a block holding paths
            _resolve_paths(raw, cwd, only=touched)
        if keys == ["model_config"]:
            _load_model_config(raw, "override")
        if keys == ["augmentations"]:
            _load_augmentations(raw, "override")

    try:
        run = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, "", RunConfig) from None
    cfg = run.model_dump(by_alias=True)
    try:
        import_plugins(cfg["imports"], where="key 'imports'")
    except ImportError as err:
        raise ConfigError(str(err)) from None

    try:
        spec = registry.get_model_spec(cfg["model_name"])
    except ValueError as err:
        raise ConfigError(f"key 'model_name': {err}") from None
    _check_model_config(spec, cfg["model_config"])

    loss_name = cfg["loss_name"] or spec.default_loss
    if loss_name is None:
        raise ConfigError(f"key 'loss_name' is missing and model {spec.name} declares no default "
                          f"loss; valid losses: {', '.join(s.name for s in registry.list_losses())}")
    try:
        loss_spec = registry.get_loss_spec(loss_name)
    except ValueError as err:
        raise ConfigError(f"key 'loss_name': {err}") from None
    cfg["loss_name"] = loss_name
    _check_loss_kwargs(loss_spec, cfg["loss"])

    _check_trainer(cfg["trainer"])
    _check_dataset(cfg, spec)
    if cfg["augmentations"] is not None:
        from ephys_gpt.dataset.augmentations import parse_augmentations

        try:
            parse_augmentations(cfg["augmentations"])
        except (ValueError, TypeError) as err:
            raise ConfigError(f"key 'augmentations': {err}") from None

    resume = cfg["resume_from"]
    if resume not in (None, "last") and not Path(resume).is_file():
        raise ConfigFileNotFoundError(f"key 'resume_from': checkpoint {resume} does not exist "
                                      "(use 'last' to continue from save_dir/checkpoints/last.ckpt)")
    _check_eval(cfg, mode)
    return cfg
