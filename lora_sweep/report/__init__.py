"""report: stored results -> the comparison table (table), findings with their noise bands (findings),
plots, the Pareto front (pareto), and one report over several sweeps (combined)."""

from lora_sweep.report.table import (COLUMNS, check_exists, guide_table, notes_lines, publish, summary,
                                     trials_frame, write_report)

__all__ = ["COLUMNS", "check_exists", "guide_table", "notes_lines", "publish", "summary", "trials_frame",
           "write_report"]
