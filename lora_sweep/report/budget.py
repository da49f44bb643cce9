"""Budget-matched comparisons (lora.param_budget): each row's LoRA parameters beside the budget."""

from __future__ import annotations

import json

import pandas as pd

NOTE = ("LoRA params: the adapter's own trainable weights (lora_A, lora_B, DoRA magnitudes; no head, no bias), "
        "with each row's deviation from lora.param_budget, which sets r to the largest rank within it.")


def budget_of(row) -> int | None:
    """The trial's lora.param_budget, from its stored params (absent: no budget, or an older study)."""
    params = row.get("params")
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError:
            return None
    value = params.get("param_budget") if isinstance(params, dict) else None
    return int(value) if value is not None else None


def budget_column(done: pd.DataFrame) -> tuple[str, list[str]] | None:
    """(header, cells) for the table: `LoRA params (budget 110,592)` and `110,592 (-0.0%)` per row;
    None when no row had a budget."""
    if not len(done) or "lora_params" not in done:
        return None
    budgets = [budget_of(r) for _, r in done.iterrows()]
    distinct = sorted({b for b in budgets if b is not None})
    if not distinct:
        return None
    header = f"LoRA params (budget {distinct[0]:,})" if len(distinct) == 1 else "LoRA params (of budget)"
    cells = []
    for n, b in zip(done["lora_params"], budgets):
        if pd.isna(n) or b is None:
            cells.append("n/a" if pd.isna(n) else f"{int(n):,}")
            continue
        of = "" if len(distinct) == 1 else f" of {b:,}"
        cells.append(f"{int(n):,}{of} ({100 * (int(n) - b) / b:+.1f}%)")
    return header, cells
