"""Typed run configs: YAML files validated against dataclasses, with dotted overrides.

    cfg = load_config("configs/synthetic_tune.yaml", ["loss.k=8", "train.iters=200"])

Unknown keys are errors that list the valid ones; values are checked for type and range in
``__post_init__`` so a bad config fails before any data is read.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segreward.errors import SegrewardError


def _choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise SegrewardError(f"{what} = {value!r} is not valid; choose one of: {', '.join(map(str, allowed))}")


def _positive(what: str, value, allow_zero: bool = False) -> None:
    if value != value or value < 0 or (value == 0 and not allow_zero) or value == float("inf"):  # != : NaN
        raise SegrewardError(f"{what} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")


def _unit(what: str, value) -> None:
    """A momentum-like value in [0, 1)."""
    if not 0 <= value < 1:  # False for NaN too
        raise SegrewardError(f"{what} must be in [0, 1), got {value}")


# Device strings a config may name; which of them exist is checked when a run starts.
_DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def check_device_name(value, what: str = "train.device") -> None:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise SegrewardError(f"{what} = {value!r} is not a device; use one of: {_DEVICE_HELP}")


@dataclass
class ModelConfig:
    name: str = field(default="unet", metadata={"help": "built-in name (unet, ...) or adapter (segformer)"})
    num_classes: int | None = field(default=None, metadata={"help": "default: from the training data"})
    checkpoint: str | None = field(default=None, metadata={"help": "weights to start from (.pt/.pth/.safetensors/mmseg)"})
    checkpoint_strict: bool = field(default=True, metadata={"help": "false: load the tensors of model.checkpoint "
                                                                    "whose names and shapes match, skip the rest "
                                                                    "(e.g. a classifier for other classes)"})
    options: dict = field(default_factory=dict, metadata={"help": "keywords for the model builder"})

    def __post_init__(self):
        if self.num_classes is not None:
            _positive("model.num_classes", self.num_classes)


@dataclass
class LossConfig:
    type: str | None = field(default=None, metadata={"help": "ce | lovasz | reinforce | reward_weighted_ce (default: "
                                                              "ce for stage pretrain, reinforce for tune)"})
    reward: Any = field(default="miou", metadata={"help": "reward name or {name: weight}"})
    estimator: str | None = field(default=None, metadata={"help": "sample (REINFORCE on whole samples) | local (exact "
                                                                       "per-pixel credit; count-based rewards); default: "
                                                                       "local for a count reward, else sample"})
    scope: str | None = field(default=None, metadata={"help": "what one reward is computed over: image | batch | "
                                                               "running; default: batch for local, image for sample"})
    momentum: float = field(default=0.9, metadata={"help": "scope running: discount of earlier batches' counts"})
    sampler: str = "categorical"
    k: int | None = field(default=None, metadata={"help": "samples per image (default: 4 for sample, 1 for local)"})
    baseline: str = "loo"
    temperature: float = 1.0
    normalize: bool = False
    ce_weight: float = 0.0
    block: int = field(default=16, metadata={"help": "region size of the coherent and local samplers, pixels"})
    fraction: float = field(default=0.05, metadata={"help": "share of regions the local sampler resamples"})
    class_weight: Any = field(default=None, metadata={"help": "list of floats or a weights.json path"})
    reward_class_weight: Any = field(default=None, metadata={"help": "class weights of the weighted_miou reward"})
    kl_weight: float = field(default=0.0, metadata={"help": "weight of KL(start model || current) per pixel, a trust "
                                                             "region around the starting checkpoint (0: off)"})

    def __post_init__(self):
        if self.type is not None:
            _choice("loss.type", self.type, LOSS_TYPES)
        if self.estimator is not None:
            _choice("loss.estimator", self.estimator, ("sample", "local"))
        if self.scope is not None:
            _choice("loss.scope", self.scope, ("image", "batch", "running"))
        _unit("loss.momentum", self.momentum)
        if self.k is not None:
            _positive("loss.k", self.k)
        _positive("loss.kl_weight", self.kl_weight, allow_zero=True)
        _positive("loss.temperature", self.temperature)
        _positive("loss.ce_weight", self.ce_weight, allow_zero=True)
        _positive("loss.block", self.block)
        if not 0 < self.fraction <= 1:
            raise SegrewardError(f"loss.fraction must be in (0, 1], got {self.fraction}")
        for name in ("class_weight", "reward_class_weight"):
            _check_class_weight(f"loss.{name}", getattr(self, name))


LOSS_TYPES = ("ce", "lovasz", "reinforce", "reward_weighted_ce")


def _check_class_weight(what: str, value) -> None:
    """A list of finite numbers >= 0 (not all 0), or a path to a weights.json (read when the run starts)."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise SegrewardError(f"{what} = {value!r} must be a list of numbers or a weights.json path")
    for i, w in enumerate(value):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise SegrewardError(f"{what}[{i}] = {w!r} is not a number")
        if not w >= 0 or w == float("inf"):  # NaN fails w >= 0
            raise SegrewardError(f"{what}[{i}] = {w} must be a finite number >= 0")
    if not any(value):
        raise SegrewardError(f"{what}: every class weight is 0; at least one must be > 0")


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = field(default="poly", metadata={"help": "constant | poly | cosine"})
    warmup_iters: int = 0
    grad_clip: float | None = None

    def __post_init__(self):
        _choice("optim.name", self.name, ("adamw", "adam", "sgd"))
        _choice("optim.schedule", self.schedule, ("constant", "poly", "cosine"))
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.momentum", self.momentum, allow_zero=True)
        _positive("optim.warmup_iters", self.warmup_iters, allow_zero=True)
        if self.grad_clip is not None:
            _positive("optim.grad_clip", self.grad_clip)


@dataclass
class TrainConfig:
    iters: int = 1000
    batch_size: int = field(default=8, metadata={"help": "global batch (split over DDP ranks)"})
    accumulate: int = field(default=1, metadata={"help": "gradient accumulation micro-steps per iteration"})
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    amp: str = field(default="none", metadata={"help": "none | bf16 | fp16 (fp16 on CUDA only)"})
    num_workers: int = 0
    augment: bool = True
    crop: list | None = field(default=None, metadata={"help": "random crop [h, w] (default: no crop)"})
    device: str = "auto"
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("iters", "batch_size", "accumulate", "eval_every", "checkpoint_every", "log_every"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.num_workers", self.num_workers, allow_zero=True)
        _choice("train.amp", self.amp, ("none", "bf16", "fp16"))
        check_device_name(self.device)
        if self.crop is not None:
            ok = (len(self.crop) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in self.crop))
            if not ok:
                raise SegrewardError(f"train.crop = {self.crop!r} must be two positive integers [height, width]")


@dataclass
class DataConfig:
    train: dict = field(default_factory=lambda: {"type": "synthetic", "style": "day", "n": 256})
    val: dict = field(default_factory=lambda: {"val": {"type": "synthetic", "style": "day", "n": 64, "split": "val"}},
                      metadata={"help": "name -> dataset spec; the first is the primary (logged without prefix)"})

    def __post_init__(self):
        if not isinstance(self.train, dict) or "type" not in self.train:
            raise SegrewardError(f"data.train must be a mapping with a 'type' key, got {self.train!r}")
        if not isinstance(self.val, dict):
            raise SegrewardError(f"data.val must map names to dataset specs, got {self.val!r}")
        for name, spec in self.val.items():
            if not isinstance(spec, dict) or "type" not in spec:
                raise SegrewardError(f"data.val.{name} must be a mapping with a 'type' key, got {spec!r}")


@dataclass
class CalibrateConfig:
    """A step after the stage: one logit offset per class, fitted exactly on a labelled set's
    dataset-level reward and folded into the final weights (``model_calibrated.safetensors``)."""
    enabled: bool = field(default=False, metadata={"help": "calibrate after the stage"})
    data: Any = field(default="train", metadata={"help": "train (the training set, no augmentation) | a data.val "
                                                         "name | a dataset spec {type: ..., ...}"})
    reward: Any = field(default="miou", metadata={"help": "a count reward: miou | weighted_miou | dice | "
                                                          "pixel_accuracy | {name: weight}"})
    reward_class_weight: Any = field(default=None, metadata={"help": "class weights of weighted_miou (list or "
                                                                     "weights.json)"})
    mode: str = field(default="auto", metadata={"help": "auto | exact (holds the set's logits) | streaming"})
    kfold: int = field(default=5, metadata={"help": "k-fold estimate of the gain on unseen images (0: off)"})
    bound: float | None = field(default=None, metadata={"help": "limit |offset| (logits) during the search"})
    max_sweeps: int = 20
    bins: int = field(default=1024, metadata={"help": "streaming mode: threshold bins per class"})

    def __post_init__(self):
        _choice("calibrate.mode", self.mode, ("auto", "exact", "streaming"))
        if self.kfold < 0 or self.kfold == 1:
            raise SegrewardError(f"calibrate.kfold must be 0 (off) or >= 2, got {self.kfold}")
        _positive("calibrate.max_sweeps", self.max_sweeps)
        if self.bound is not None:
            _positive("calibrate.bound", self.bound)
        if self.bins < 2 or self.bins % 2:
            raise SegrewardError(f"calibrate.bins must be an even number >= 2, got {self.bins}")
        if not isinstance(self.data, (str, dict)) or (isinstance(self.data, dict) and "type" not in self.data):
            raise SegrewardError(f"calibrate.data must be 'train', a data.val name or a dataset spec with a "
                                 f"'type' key, got {self.data!r}")


@dataclass
class PseudoLabelConfig:
    """Unsupervised adaptation: train on a teacher's confident predictions instead of labels."""
    enabled: bool = field(default=False, metadata={"help": "ignore the training labels; use pseudo-labels"})
    only_unlabelled: bool = field(default=False, metadata={
        "help": "semi-supervised: frames with a labelled pixel keep their labels; only frames without any get "
                "pseudo-labels"})
    teacher: str = field(default="start", metadata={"help": "start (frozen copy of the starting model) | ema"})
    threshold: float = field(default=0.9, metadata={"help": "pixels whose teacher confidence is lower are ignored"})
    ema_momentum: float = 0.999

    def __post_init__(self):
        _choice("pseudo_label.teacher", self.teacher, ("start", "ema"))
        if self.only_unlabelled and not self.enabled:
            raise SegrewardError("pseudo_label.only_unlabelled=true needs pseudo_label.enabled=true (it says which "
                                 "frames get pseudo-labels)")
        _unit("pseudo_label.threshold", self.threshold)
        _unit("pseudo_label.ema_momentum", self.ema_momentum)


@dataclass
class Config:
    name: str = "run"
    stage: str = field(default="pretrain", metadata={"help": "pretrain (cross-entropy) | tune (reward)"})
    seed: int = 0
    work_dir: str | None = field(default=None, metadata={"help": "default: runs/<name>"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)

    def __post_init__(self):
        _choice("stage", self.stage, ("pretrain", "tune"))
        if not self.name.strip() or self.name in (".", "..") or re.search(r"[/\\\x00]", self.name):
            raise SegrewardError(f"name = {self.name!r} must be a plain folder name (no '/', not '..'): the run goes "
                                 "to runs/<name>; set work_dir to put it somewhere else")
        if self.work_dir is None:
            self.work_dir = str(Path("runs") / self.name)

    @property
    def loss_type(self) -> str:
        return self.loss.type or ("ce" if self.stage == "pretrain" else "reinforce")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_ok(value, annotation) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is not None:
        annotation = origin
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise SegrewardError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SegrewardError(f"unknown config key{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(prefix + k for k in unknown)}; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
            continue
        if _type_ok(value, float) and hint in (float, float | None):
            value = float(value)
        if not _type_ok(value, hint):
            tname = getattr(hint, "__name__", str(hint))
            raise SegrewardError(f"config key {prefix}{name} = {value!r} has type {type(value).__name__}; expected {tname}")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SegrewardError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise SegrewardError(f"override {item!r} must look like section.key=value (e.g. loss.k=8)")
        key, raw = item.split("=", 1)
        try:
            value = yaml_value(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise SegrewardError(f"override {item!r}: the value is not valid YAML "
                                 f"({' '.join(str(e).split())}); quote it or close its brackets") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section; an empty mapping (``data.val={}``) replaces."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    return _build(Config, _merge(data or {}, parse_overrides(overrides)))


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads numbers as YAML 1.2 does: PyYAML follows YAML 1.1, where a
    float needs a dot, so ``1e-4`` and ``3e-3`` would be strings. Used for config files and for
    ``key=value`` overrides alike."""


# PyYAML keeps one list of implicit resolvers per first character; replace the float one with
# YAML 1.2's (the 1.1 forms with a dot, plus 1e-4 / 3E+2 without one).
_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_value(text: str):
    """One YAML scalar or flow value as a config reads it (``1e-4`` is a float)."""
    return yaml.load(text, Loader=_Loader)


class _StrictLoader(_Loader):
    """The config loader, refusing a key given twice in one mapping (plain YAML keeps the last)."""


def _no_duplicates(loader: _StrictLoader, node, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise SegrewardError(f"key {key!r} appears twice in one section (lines {seen[key] + 1} and "
                                 f"{key_node.start_mark.line + 1}); keep one")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: str | Path, what: str = "config file"):
    """Parse a YAML file; a one-line :class:`SegrewardError` naming it if it is missing, a folder,
    not UTF-8 text, not YAML, or has a key twice in one mapping."""
    p = Path(path)
    if p.is_dir():
        raise SegrewardError(f"{p}: is a folder, not a {what}")
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SegrewardError(f"{p}: {what} not found") from None
    except UnicodeDecodeError:
        raise SegrewardError(f"{p}: not a text {what} (not UTF-8); give a YAML file") from None
    except OSError as e:
        raise SegrewardError(f"{p}: cannot read the {what} ({e.strerror or e})") from None
    if "\x00" in text:
        raise SegrewardError(f"{p}: not a text {what} (binary data); give a YAML file")
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise SegrewardError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    except SegrewardError as e:
        raise SegrewardError(f"{p}: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path is not None:
        p = Path(path)
        data = read_yaml(p)
        if data is None:
            raise SegrewardError(f"{p}: the config file is empty; give at least the sections to change "
                                 "(e.g. 'data:' and 'model:'), or '{}' to train with every default")
        if not isinstance(data, dict):
            raise SegrewardError(f"{p}: a config must be a mapping of sections, got {type(data).__name__}")
    try:
        return config_from_dict(data, overrides)
    except SegrewardError as e:
        raise SegrewardError(f"{path}: {e}" if path else str(e)) from None
