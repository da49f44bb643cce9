"""lora-sweep: which LoRA configuration should I use? Answered by measurement.

Importing the package is cheap: torch, transformers, peft and mlflow load only when a sweep runs.
"""

__version__ = "0.1.0"
