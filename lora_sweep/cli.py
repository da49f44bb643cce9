"""python -m lora_sweep +sweep=rank [overrides]      run (or resume) a sweep
python -m lora_sweep report +sweep=rank              rebuild reports/rank/ from stored results
python -m lora_sweep report sweep=rank,bias          one report over several stored sweeps
python -m lora_sweep ui sweep=rank [ui.port=N]       the MLflow UI on the sweep, until Ctrl-C
python -m lora_sweep export sweep=rank [trial=N]     the recommended (or trial N's) adapter, verified

Reads as the data flow: compose (Hydra) -> validate (lora_sweep.config) -> sweep or report. The
one error boundary: a ConfigError from any stage becomes one line and exit 2.

Exit codes:
  0    done (a sweep with at least one completed trial, or a report)
  2    bad input: one line `lora-sweep: error: <field>=<value>: <what is wrong>; <what to do>` on
       stderr, and nothing written (no study, MLflow run, log or report)
  3    the sweep ran but none of its study's trials completed (all failed, pruned or excluded); the
       report says why. With study.workers=N each worker, and so the launcher, exits 3
  130  interrupted (Ctrl-C or SIGTERM); re-run the same command to resume
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

# The wheel ships conf/ as lora_sweep/conf; a checkout (editable install) has it beside the package.
# An absolute path: Hydra's relative config_path would mean pkg://lora_sweep/conf, which a checkout lacks.
_PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = next((d for d in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf") if (d / "config.yaml").is_file()),
                _PACKAGE_DIR / "conf")
# Hydra's flags whose value is the next argument; normalise_argv passes that value through untouched.
_HYDRA_VALUE_FLAGS = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--cfg", "-c",
                      "--package", "-p", "--experimental-rerun"}
log = logging.getLogger("lora_sweep")


def main() -> None:
    """The entry point of both `lora-sweep` and `python -m lora_sweep`."""
    sys.argv = [sys.argv[0], *normalise_argv(sys.argv[1:])]
    try:
        _hydra_entry()
    except SystemExit as e:  # Hydra and our errors end this way; code None means success
        if not isinstance(e.code, (int, type(None))):
            raise
        _exit_now(e.code or 0)
    _exit_now(0)


_VERBS = ("report", "export", "ui")


def normalise_argv(args: list[str]) -> list[str]:
    """`report` as a verb -> mode=report; `sweep=X` -> `+sweep=X` (the sweep group is optional, so
    Hydra wants the +; both spellings work); `sweep=A,B` -> `+sweep=A report.sweeps=[A,B]` (Hydra
    would read a comma as a multirun; here it means one report over both). For the verbs that read a
    stored sweep (report, export, ui), `sweep=X` where X is no sweep file (conf/sweep/X.yaml, or in a
    --config-dir's sweep/) names the study: `study.name=X`; its stored settings supply the rest."""
    values = {i for i, a in enumerate(args) if i and args[i - 1] in _HYDRA_VALUE_FLAGS}
    verb = any(a in _VERBS or a in {f"mode={v}" for v in _VERBS} for i, a in enumerate(args) if i not in values)
    out = []
    for i, a in enumerate(args):
        if i in values:  # `--config-dir report` names a folder, not the verb
            out.append(a)
        elif a in _VERBS:
            out.append(f"mode={a}")
        elif a.startswith(("trial=", "dest=")) and "export" in args:  # export's own keys, unprefixed
            out.append(f"export.{a}")
        elif a.startswith(("sweep=", "+sweep=")):
            names = [n.strip() for n in a.split("=", 1)[1].split(",")]
            if verb and len(names) == 1 and not _is_sweep_file(names[0], args):
                out.append(f"study.name={names[0]}")
            else:
                out.append(f"+sweep={names[0]}")
            if len(names) > 1:
                out.append(f"report.sweeps=[{','.join(names)}]")
        else:
            out.append(a)
    return out


def _is_sweep_file(name: str, args: list[str]) -> bool:
    """A sweep config file of that name in conf/sweep/ or in the sweep/ folder of a --config-dir."""
    dirs = [CONF_DIR]
    for i, a in enumerate(args):
        if a in ("--config-dir", "-cd") and i + 1 < len(args):
            dirs.append(Path(args[i + 1]))
        elif a.startswith("--config-dir="):
            dirs.append(Path(a.split("=", 1)[1]))
    return any((Path(d) / "sweep" / f"{name}{ext}").is_file() for d in dirs for ext in (".yaml", ".yml"))


# The warnings a sweep prints that a user can do nothing about, each by its message; any other
# warning (a new one after an upgrade, one of ours) still reaches the user.
QUIET_WARNINGS = (
    # peft's get_peft_model reads transformers' deprecated alias, once per trial
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)


def quiet_third_party() -> None:
    """Keep our progress lines readable: library chatter a user does not need goes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
    # transformers' GGUF reader draws a tqdm bar that its own progress-bar switch does not reach.
    os.environ.setdefault("TQDM_DISABLE", "1")
    from lora_sweep.config.urls import RedactFilter

    worker = os.environ.get("LORA_SWEEP_WORKER")  # set by study.workers=N for each worker it starts
    prefix = f"[w{worker}] " if worker else ""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactFilter())
    log.setLevel(logging.INFO)
    for noisy in ("transformers", "datasets", "peft", "mlflow", "alembic", "urllib3", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    import optuna
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report each trial


def run(cfg, overrides: tuple[str, ...] = ()) -> int:
    """cfg: the composed config; overrides: what the user typed (Hydra's task overrides), which export,
    report and ui check against a sweep's stored settings (empty: nothing typed to check)."""
    from lora_sweep.config import ConfigError, from_dictconfig

    try:
        config = from_dictconfig(cfg, overrides)  # before torch & co. load: a mistyped value fails in a second
        quiet_third_party()
        if config.mode == "report":
            return _report(config)
        if config.mode == "ui":
            from lora_sweep.run.ui import serve_ui

            return serve_ui(config)
        if config.mode == "export":
            from lora_sweep.report.export import export

            return export(config)
        if len(config.report.sweeps) > 1:
            raise ConfigError(f"report.sweeps={list(config.report.sweeps)}: several sweeps go into one report "
                              f"only in report mode (python -m lora_sweep report sweep=a,b); run sweeps one "
                              f"at a time.")
        from lora_sweep.run import sweep_or_launch

        result = sweep_or_launch(config)
        return result if isinstance(result, int) else sweep_exit_code(result)
    except ConfigError as e:
        from lora_sweep.config.urls import redact

        print(f"lora-sweep: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the trial is recorded as failed, runs are closed
        print(f"lora-sweep: interrupted ({e or 'Ctrl-C'}); re-run the same command to resume.", file=sys.stderr)
        return 130


NO_TRIAL_COMPLETED = 3


def sweep_exit_code(study) -> int:
    """0 when at least one of the study's trials completed (counting other workers'), else 3."""
    from optuna.trial import TrialState

    return 0 if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else NO_TRIAL_COMPLETED


def _report(config) -> int:
    from lora_sweep import report

    if len(config.report.sweeps) > 1:
        from lora_sweep.report.combined import write_combined

        path, text = write_combined(config)
        print(text)
        log.info("Wrote %s", path)
        return 0
    from lora_sweep.search.study import load_stored

    report.check_exists(config)
    config, study = load_stored(config)  # the sweep's own settings, stored with its study
    path = report.write_report(config, study)
    report.publish(config, study, path)
    print(report.summary(config, study))
    if config.study.multi_objective:
        from lora_sweep.report import pareto

        print(pareto.format_front(config, pareto.store(config, study)[0]))
    log.info("Wrote %s", path)
    return 0


def _hydra_entry() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def entry(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        code = run(cfg, tuple(HydraConfig.get().overrides.task))
        if code:
            sys.exit(code)

    entry()


def _exit_now(code: int) -> None:
    """End the process without tearing down the interpreter: after a sweep, finalizing the heap
    torch, transformers and the rest built takes ~2 s, measured between the last line printed and
    the exit. Exit handlers still run (temp dirs, library flushes); open files are flushed first."""
    import atexit

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

