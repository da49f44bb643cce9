"""config: the frozen, validated settings of a sweep; imports nothing from the later stages.

checks (ConfigError and its wording) < names (every allowed name) < urls, paths (what a storage URL,
tracking URI or local path must be), claims (the published claims a report checks) < schema (dataclasses)
< load (DictConfig -> Config).
"""

from lora_sweep.config.checks import ConfigError, flatten, flatten_paths
from lora_sweep.config.claims import Claim
from lora_sweep.config.load import from_dictconfig, from_mapping
from lora_sweep.config.paths import resolve_path
from lora_sweep.config.schema import (Config, DataConfig, ExportConfig, LoraSettings, ModelConfig, Paths, ReportConfig,
                                      StudyConfig, TrackingConfig, TrainConfig, TrialSettings, Variant)

__all__ = [
    "Claim", "Config", "ConfigError", "DataConfig", "ExportConfig", "ReportConfig", "LoraSettings", "ModelConfig", "Paths", "StudyConfig",
    "TrackingConfig", "TrainConfig", "TrialSettings", "Variant", "flatten", "flatten_paths", "from_dictconfig",
    "from_mapping", "resolve_path",
]
