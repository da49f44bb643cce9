"""lora-sweep: which LoRA configuration should I use? Answered by measurement.

Importing the package is cheap: torch, transformers, peft and mlflow load only when a sweep runs.
"""

import time as _time

__version__ = "0.1.0"
# When this process reached lora_sweep: a sweep's "startup" (imports, Hydra, validation) counts from here.
IMPORTED_AT = _time.perf_counter()
