"""Hydra's DictConfig -> validated, frozen dataclasses. DictConfig stops here.

Every error names the field, the value it got and what is allowed, so that a bad command line
fails before anything is trained or written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from lora_sweep.config.checks import ConfigError, _build, _one_of, _require, flatten, flatten_paths
from lora_sweep.config.claims import parse_claims
from lora_sweep.config.names import CHAT_DIALECTS, CHAT_FORMATS, MODES, METRIC_DIRECTIONS, metric_names
from lora_sweep.config.schema import (_GROUP_TYPES, Config, ExportConfig, Paths, ReportConfig, StudyConfig, TrackingConfig,
                                      TrialSettings, UiConfig, Variant)


def from_dictconfig(cfg: Any, overrides: Sequence[str] = ()) -> Config:
    """Validate a composed Hydra config and freeze it into dataclasses. overrides: what the user typed
    (Hydra's task overrides), kept on the Config for the verbs that read a sweep's stored settings."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    return from_mapping(raw, overrides)


def from_mapping(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
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
                    conditions=conditions, exclude=exclude, claims=parse_claims(raw.get("claims"), variants, space),
                    raw=plain(raw), overrides=tuple(map(str, overrides)))
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
    labelled = base.data.label_column is not None and base.data.format not in CHAT_FORMATS + CHAT_DIALECTS + ("text",)
    available = metric_names(base.lora.task_type, labelled=labelled, chat=base.data.format in CHAT_FORMATS + CHAT_DIALECTS)
    if base.data.format == "auto" and base.lora.task_type == "CAUSAL_LM" and study.metric in metric_names(
            "CAUSAL_LM", chat=True):
        return  # a generation metric may fit instruction/chat data, known once loaded: runner.check_data decides
    _require(study.metric in available, "study.metric", study.metric,
             f"one of {', '.join(available)} (what lora.task_type={base.lora.task_type} measures"
             + ("" if base.data.label_column else " on plain text") + ")")


def plain(value: Any) -> Any:
    """JSON-able plain data (lists, dicts with string keys, scalars): what a study attribute can hold."""
    return json.loads(json.dumps(value, default=str))


# -- a sweep's settings, stored with its study, read back by export, report and ui -------------------------

# What those verbs take from their own command line: the output they write (claims too: a reading of the stored
# results, so a report may check claims the sweep ran without) and where the stores are (a location must be
# given to find the study at all; a stored one may be another machine's, or redacted).
OUTPUT_KEYS = ("mode", "export", "report", "ui", "claims")
LOCATION_KEYS = ("study.name", "study.storage", "paths.sweeps_dir", "paths.reports_dir", "tracking.uri")
# What a trial computed from: a typed value that differs from the stored one is refused, not applied.
COMPUTED_KEYS = ("model", "data", "lora", "train", "space", "variants", "conditions", "study.metric", "study.tune",
                 "study.race", "study.race_eta")
_MISSING = object()


def to_stored(config: Config) -> dict:
    """{"config": the resolved mapping the config was built from, "overrides": what the user typed}, plain
    data with passwords in URLs redacted (the verbs that read it take locations from their own command line)."""
    from lora_sweep.config.urls import redact

    raw = plain(config.raw)
    for key in ("study.storage", "tracking.uri"):
        value = _get(raw, key)
        if isinstance(value, str):
            _set(raw, key, redact(value))
    return {"config": raw, "overrides": [redact(o) for o in config.overrides]}


def from_stored(config: Config, stored: Mapping[str, Any]) -> tuple[Config, list[str]]:
    """The config of the sweep whose stored settings these are, with this command line's output and
    location keys (OUTPUT_KEYS, LOCATION_KEYS); and the typed overrides it did not apply, as `key=value`
    notes. A typed value of what the trials computed from (COMPUTED_KEYS) that differs from the stored one
    is a ConfigError. No stored settings (a study written before they were stored): the config unchanged."""
    if not stored or not isinstance(stored.get("config"), Mapping) or not stored["config"]:
        return config, []
    then = stored["config"]
    now = plain(config.raw)
    ignored = []
    for typed in typed_keys(config.overrides):
        for key, value, was in _differences(typed, _get(now, typed), _get(then, typed)):
            if _under(key, OUTPUT_KEYS + LOCATION_KEYS):
                continue
            if _under(key, COMPUTED_KEYS):
                raise ConfigError(f"{key}={_show(value)}: sweep {config.study.name} ran with {_show(was)}; "
                                  f"leave it out ({config.mode} reads the sweep's stored settings)")
            ignored.append(f"{key}={_show(value)} (the sweep ran with {_show(was)})")
    merged = copy.deepcopy(dict(then))
    for key in OUTPUT_KEYS + LOCATION_KEYS:
        value = _get(now, key)
        if value is _MISSING:
            _pop(merged, key)
        else:
            _set(merged, key, copy.deepcopy(value))
    try:
        rebuilt = from_mapping(merged, config.overrides)
    except ConfigError as e:
        raise ConfigError(f"{e} (in the settings sweep {config.study.name} stored with its study)") from None
    return rebuilt, ignored


def typed_keys(overrides: Sequence[str]) -> list[str]:
    """The config paths a user's Hydra overrides set: `+a.b=1`, `~a.b`, `a.b=1` -> a.b; `model=x` -> model."""
    keys = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~").split("@", 1)[0].strip()
        if key and key not in keys:
            keys.append(key)
    return keys


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _differences(key: str, now: Any, was: Any) -> list[tuple[str, Any, Any]]:
    """(path, value now, stored value) for each leaf under key that differs; a group compares leaf by leaf."""
    if isinstance(now, Mapping) and now and isinstance(was, Mapping) and was:
        a, b = flatten(now, key + "."), flatten(was, key + ".")
        return [(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in [*a, *(k for k in b if k not in a)]
                if a.get(k, _MISSING) != b.get(k, _MISSING)]
    return [] if now == was else [(key, now, was)]


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)


def _get(d: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _set(d: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[last] = value


def _pop(d: dict, key: str) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.get(part)
        if not isinstance(d, dict):
            return
    d.pop(last, None)
