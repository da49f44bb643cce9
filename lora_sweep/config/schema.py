"""The frozen dataclasses a sweep is configured by, each with the validation of its own fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from lora_sweep.config.checks import (ConfigError, _bool, _build, _codec, _is_number, _normalise, _one_of,
                                      _positive_int, _require)
from lora_sweep.config.claims import Claim
from lora_sweep.config.names import (BIAS_CHOICES, CHAT_DIALECTS, CHAT_FORMATS, COMPUTE_DTYPES, DATA_FORMATS, DEVICES,
                                     GENERATE_AT, MIXED_PRECISION, QUANT_TYPES, SAMPLING_STRATEGIES, TASK_TYPES,
                                     TRUNCATIONS)
from lora_sweep.config.paths import check_local
from lora_sweep.config.study import StudyConfig
from lora_sweep.config.urls import check_tracking_uri



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
        check_local("model.name_or_path", self.name_or_path, "an existing model folder (config.json and "
                    "weights) or .gguf file, pkg://PACKAGE/PATH inside an installed package, or a hub id")
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
    encoding: str = "auto"               # local files: auto = UTF-8 (BOM handled) if it decodes, else detected
    text_column: str = "text"
    label_column: str | None = "label"   # null: plain text (language modelling, CAUSAL_LM only)
    labels: tuple | None = None
    train_size: int = 2000
    eval_size: int = 500
    # A held-out test split drawn from the rows outside train and eval (those stay as they were),
    # scored once after training; nothing that chooses (sampler, pruner, confirmation) reads it.
    test_size: int | None = None         # null: no test split
    max_length: int = 128
    seed: int = 0
    # CAUSAL_LM / SEQ_2_SEQ_LM on labelled data: the model reads the prompt and writes the label.
    prompt: str = "Sentiment of: {text} ->"
    generate_size: int | None = None     # eval examples whose label is generated; null = all of them
    generate_at: str = "auto"            # every evaluation | last; auto: every on labelled data, last on instruction/chat
    # The examples' shape (lora_sweep/trial/chat.py): auto detects it from the columns, TRL's names first.
    format: str = "auto"                 # auto | labelled | text | prompt_completion | messages
    prompt_column: str = "prompt"        # prompt_completion: the instruction ...
    completion_column: str = "completion"  # ... and the answer the loss is on
    messages_column: str = "messages"    # messages: a list of {role, content}, rendered by the chat template
    truncation: str = "left"             # an example over max_length: cut its prompt from the left, or drop it
    # Chat dialects: the key names of a turn and the data's role names -> system/user/assistant
    # (ShareGPT: from/value, {human: user, gpt: assistant}); auto-detection fills them for ShareGPT.
    role_key: str = "role"
    content_key: str = "content"
    roles: tuple | None = None           # ((their name, ours), ...); a mapping is accepted and frozen
    max_bad_rows: float = 0.01           # malformed records that may be set aside, a share of those read
    max_new_tokens: int = 64             # generated answers stop at end of sequence/turn, or after this many
    retention_size: int = 32             # CAUSAL_LM: English passages scored before/after (forgetting); 0 = off

    def __post_init__(self):
        if self.encoding is None:  # settings stored before data.encoding had auto
            object.__setattr__(self, "encoding", "auto")
        roles = self.roles
        if isinstance(roles, dict):
            roles = tuple(sorted((str(k), v) for k, v in roles.items()))
        elif isinstance(roles, (list, tuple)):
            roles = tuple(tuple(pair) if isinstance(pair, (list, tuple)) else pair for pair in roles)
        object.__setattr__(self, "roles", roles)

    def role_map(self) -> dict:
        """data.roles as a dict (their role name -> system|user|assistant); {} when unset."""
        return dict(self.roles or ())

    def validate(self) -> None:
        _one_of("data.format", self.format, DATA_FORMATS)
        _one_of("data.truncation", self.truncation, TRUNCATIONS)
        _one_of("data.generate_at", self.generate_at, GENERATE_AT)
        _require(self.encoding == "auto" or _codec(self.encoding), "data.encoding", self.encoding,
                 "auto, or a codec Python knows (utf-8, latin-1, cp1252, ...)")
        if self.roles is not None:
            ok = all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and p[1] in ("system", "user", "assistant")
                     for p in self.roles)
            shown = dict(p for p in self.roles if isinstance(p, tuple) and len(p) == 2) or self.roles  # as typed
            _require(ok and self.roles, "data.roles", shown,
                     "null or a mapping of the data's role names to system, user or assistant, e.g. {human: user, gpt: assistant}")
        _require(_is_number(self.max_bad_rows) and 0 <= self.max_bad_rows <= 1, "data.max_bad_rows",
                 self.max_bad_rows, "a share of the records between 0 and 1 (0.01 = 1%)")
        _positive_int("data.max_new_tokens", self.max_new_tokens)
        _require(isinstance(self.retention_size, int) and not isinstance(self.retention_size, bool)
                 and self.retention_size >= 0, "data.retention_size", self.retention_size,
                 "an integer >= 0 (0: no forgetting measure)")
        for name in ("prompt_column", "completion_column", "messages_column", "role_key", "content_key"):
            _require(isinstance(getattr(self, name), str) and getattr(self, name), f"data.{name}",
                     getattr(self, name), "a column name")
        _require(isinstance(self.name_or_path, str) and self.name_or_path, "data.name_or_path",
                 self.name_or_path, "a local csv/json/jsonl/parquet file, pkg://PACKAGE/PATH or a dataset name")
        check_local("data.name_or_path", self.name_or_path, "an existing csv/json/jsonl/parquet file, "
                    "pkg://PACKAGE/PATH inside an installed package, or a dataset name")
        for name in ("train_size", "eval_size", "max_length"):
            _positive_int(f"data.{name}", getattr(self, name))
        if self.generate_size is not None:
            _positive_int("data.generate_size", self.generate_size)
        _require(self.test_size is None or (isinstance(self.test_size, int) and not isinstance(self.test_size, bool)
                                            and self.test_size > 0),
                 "data.test_size", self.test_size, "null (no test split) or an integer > 0")
        _require(isinstance(self.prompt, str) and "{text}" in self.prompt, "data.prompt", self.prompt,
                 "a template that contains {text}, e.g. 'Sentiment of: {text} ->'")
        _require(self.label_column is None or (isinstance(self.label_column, str) and self.label_column),
                 "data.label_column", self.label_column, "a column name, or null for plain text")
        if self.labels is not None:
            _require(len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels), "data.labels",
                     list(self.labels), "null or a list of at least two distinct labels")


def lora_scale(r, lora_alpha, use_rslora=False) -> float:
    """peft's scaling of a LoRA update: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r, alpha = float(r), float(lora_alpha)
    return alpha / (r ** 0.5 if use_rslora else r)


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
    param_budget: int | None = None  # trainable LoRA parameters (head excluded): r is derived per model and preset

    @property
    def effective_alpha(self) -> float:
        """lora_alpha as peft will get it: tied to r when alpha_ratio is set."""
        alpha = self.alpha_ratio * self.r if self.alpha_ratio is not None else self.lora_alpha
        return int(alpha) if float(alpha).is_integer() else float(alpha)

    @property
    def scale(self) -> float:
        """The factor peft multiplies the adapter's update by (lora_scale)."""
        return lora_scale(self.r, self.effective_alpha, self.use_rslora)

    def peft_kwargs(self) -> dict:
        """peft.LoraConfig's keyword arguments, target_modules aside (resolved per model): the one place
        these settings become peft's names (adapters, MLflow params, the benchmarks)."""
        return {"r": self.r, "lora_alpha": self.effective_alpha, "lora_dropout": self.lora_dropout,
                "bias": self.bias, "use_rslora": self.use_rslora, "use_dora": self.use_dora,
                "init_lora_weights": self.init_lora_weights, "task_type": self.task_type}

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
        if self.param_budget is not None:
            _require(isinstance(self.param_budget, int) and not isinstance(self.param_budget, bool)
                     and self.param_budget > 0, "lora.param_budget", self.param_budget,
                     "null or an integer > 0 (trainable LoRA parameters; r becomes the largest that fits)")
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
    fast_dropout: bool = True      # CPU: dropout masks from numpy's SFC64 (lora_sweep/trial/dropout.py)
    fast_attention: bool = True    # with fast_dropout: attention-probability masks too (trial/dropout.py)
    eval_steps: int | None = None  # null: evaluate (and report to the pruner) every epoch; N: every N steps
    memory_limit_mb: float | None = None  # a trial predicted to need more is pruned as infeasible, never trained

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
        _bool("train.fast_attention", self.fast_attention)
        if self.eval_steps is not None:
            _positive_int("train.eval_steps", self.eval_steps)
        _require(self.memory_limit_mb is None or (_is_number(self.memory_limit_mb) and self.memory_limit_mb > 0),
                 "train.memory_limit_mb", self.memory_limit_mb, "null or a number of megabytes > 0")


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    experiment_name: str | None = None
    log_artifacts: bool = True

    def validate(self) -> None:
        if self.uri is not None:
            check_tracking_uri(self.uri)


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
class ExportConfig:
    """Export mode: one trial's adapter, head, tokenizer and model card, verified (python -m lora_sweep export)."""
    trial: Any = None             # a trial number; null = the report's recommendation
    dest: str | None = None       # the folder; null = exports/<sweep>/trial-<N>
    registered_name: str | None = None  # MLflow registry name; null = lora-sweep-<sweep>

    def validate(self) -> None:
        _require(self.trial is None or (isinstance(self.trial, int) and not isinstance(self.trial, bool)
                                        and self.trial >= 0), "export.trial", self.trial,
                 "null (the recommended trial) or a trial number >= 0 (the report's Trial column: #3 -> trial=3)")
        _require(self.dest is None or (isinstance(self.dest, str) and self.dest), "export.dest", self.dest,
                 "null (exports/<sweep>/trial-<N>) or a folder")
        _require(self.registered_name is None or (isinstance(self.registered_name, str) and self.registered_name),
                 "export.registered_name", self.registered_name, "null (lora-sweep-<sweep>) or a model name")


@dataclass(frozen=True)
class UiConfig:
    """UI mode: the MLflow UI on the sweep's store (python -m lora_sweep ui sweep=rank)."""
    port: Any = None              # null = a free port on 127.0.0.1

    def validate(self) -> None:
        _require(self.port is None or (isinstance(self.port, int) and not isinstance(self.port, bool)
                                       and 0 < self.port < 65536), "ui.port", self.port,
                 "null (a free port) or a port number 1-65535")


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
        # r needs the model's layer shapes before the trial; a 4-bit base is loaded only inside it
        _require(self.lora.param_budget is None or not self.model.load_in_4bit, "lora.param_budget",
                 self.lora.param_budget, "null with model.load_in_4bit=true (set lora.r instead)")
        if self.data.label_column is None and self.lora.task_type != "CAUSAL_LM":
            raise ConfigError(f"data.label_column=None (plain text) works only with lora.task_type=CAUSAL_LM "
                              f"(language modelling), but got lora.task_type={self.lora.task_type!r}. Name the "
                              f"label column, or set lora.task_type=CAUSAL_LM.")
        if self.data.format in CHAT_FORMATS + CHAT_DIALECTS and self.lora.task_type != "CAUSAL_LM":
            raise ConfigError(f"data.format={self.data.format!r} (instruction/chat data) works only with "
                              f"lora.task_type=CAUSAL_LM, but got lora.task_type={self.lora.task_type!r}.")
        _require(self.data.format != "labelled" or self.data.label_column is not None, "data.label_column",
                 None, "a column name with data.format=labelled")

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
    export: ExportConfig = ExportConfig()
    ui: UiConfig = UiConfig()
    conditions: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)  # path -> {when/requires}
    exclude: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)     # name -> {when, message}
    claims: tuple[Claim, ...] = ()    # published claims the report checks (config/claims.py); () = none
    # The resolved mapping this config was built from (plain data: what a sweep stores with its study),
    # and the overrides the user typed (Hydra's task overrides; empty when built otherwise). Neither is
    # part of the configuration's identity: two spellings of one configuration are equal.
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)
    overrides: tuple[str, ...] = dataclasses.field(default=(), compare=False, hash=False)

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


