"""Configuration: frozen dataclasses filled from defaults, a preset TOML and overrides.

Flow: dataclass defaults -> preset TOML -> user TOML -> ``--set`` -> flags -> ``validate()`` -> frozen
``Config`` (``loading.resolve_config``). Each field declares itself once in ``schema.py``: its
default, help text, choices, bounds and, where a command offers one, the flag that sets it; CLI
flags, ``lowmcgm config-keys`` and ``validation.py`` read them from the field.

The names below are the package's interface, for the library's callers and its own modules outside
``config/``; inside it, each module imports from the one that defines a name.
"""

from lowmcgm.config.loading import (apply_overrides, config_from_dict, config_to_dict, flatten_toml, load_toml,
                                    parse_set, resolve_config, to_toml)
from lowmcgm.config.schema import (CHOICES, Config, DataConfig, LoraConfig, LossConfig, ModelConfig, OutputConfig,
                                   SampleSettings, TrainConfig, all_keys, config_field, field_flag, field_help,
                                   section_types)
from lowmcgm.config.validation import sample_problems, validate

__all__ = ["CHOICES", "Config", "DataConfig", "LoraConfig", "LossConfig", "ModelConfig", "OutputConfig",
           "SampleSettings", "TrainConfig", "all_keys", "apply_overrides", "config_field", "config_from_dict",
           "config_to_dict", "field_flag", "field_help", "flatten_toml", "load_toml", "parse_set", "resolve_config",
           "sample_problems", "section_types", "to_toml", "validate"]
