"""cli.quiet_third_party silences the warnings it names, and only those."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import warnings
from lora_sweep.cli import quiet_third_party
quiet_third_party()
warnings.warn("something new", UserWarning)
warnings.warn("a deprecation of tomorrow", FutureWarning)
from transformers import BertConfig, BertModel
model = BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=8))
model.is_gradient_checkpointing  # what peft reads in every trial: a named warning
print("done")
"""


def test_a_warning_quiet_third_party_does_not_name_still_reaches_the_user(tmp_path):
    # A fresh process: the filters, log levels and environment it sets are the process's own.
    proc = subprocess.run([sys.executable, "-W", "default", "-c", SCRIPT], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert "UserWarning: something new" in proc.stderr
    assert "FutureWarning: a deprecation of tomorrow" in proc.stderr
    assert "is_gradient_checkpointing" not in proc.stderr
