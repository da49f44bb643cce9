"""Hydra's DictConfig -> validated, frozen dataclasses. DictConfig stops here.

Every error names the field, the value it got and what is allowed, so that a bad command line
fails before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from lora_sweep.config.checks import ConfigError, _build, _one_of, _require, flatten, flatten_paths
from lora_sweep.config.names import CHAT_FORMATS, MODES, METRIC_DIRECTIONS, metric_names
from lora_sweep.config.schema import (_GROUP_TYPES, Config, ExportConfig, Paths, ReportConfig, StudyConfig, TrackingConfig,
                                      TrialSettings, UiConfig, Variant)


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
    tracking.validate()
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
    export = _build(ExportConfig, raw.get("export") or {}, "export")
    export.validate()
    ui = _build(UiConfig, raw.get("ui") or {}, "ui")
    ui.validate()
    conditions = {str(k): dict(v) if isinstance(v, Mapping) else v
                  for k, v in flatten_paths(raw.get("conditions") or {}).items()}
    exclude = {str(k): v for k, v in (raw.get("exclude") or {}).items() if v is not None}
    config = Config(base=base, study=study, tracking=tracking, paths=paths, space=space,
                    variants=variants, mode=mode, report=report, export=export, ui=ui,
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
    # data.format=auto: instruction/chat data is only known once loaded (lora_sweep.trial.runner.check_data)
    labelled = base.data.label_column is not None and base.data.format not in CHAT_FORMATS + ("text",)
    available = metric_names(base.lora.task_type, labelled=labelled, chat=base.data.format in CHAT_FORMATS)
    if base.data.format == "auto" and base.lora.task_type == "CAUSAL_LM" and study.metric in metric_names(
            "CAUSAL_LM", chat=True):
        return  # a generation metric may fit instruction/chat data, known once loaded: runner.check_data decides
    _require(study.metric in available, "study.metric", study.metric,
             f"one of {', '.join(available)} (what lora.task_type={base.lora.task_type} measures"
             + ("" if base.data.label_column else " on plain text") + ")")
