"""report: stored results -> rows (frame) -> the comparison table (table) and its footnotes (notes), findings
with their paired tests (findings, paired, stats), the confirmation stage's verdict (confirm), the one
recommendation (recommend), plots, the Pareto front (pareto), one report over several sweeps (combined), export."""

from lora_sweep.report.notes import notes_lines
from lora_sweep.report.table import (COLUMNS, check_exists, guide_table, publish, summary, trials_frame,
                                     write_report)

__all__ = ["COLUMNS", "check_exists", "guide_table", "notes_lines", "publish", "summary", "trials_frame",
           "write_report"]
