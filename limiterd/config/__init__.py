from limiterd.config.loader import ConfigError, check_config, load_config, parse_config
from limiterd.config.model import Config, Limits, ModelRule, ScopeConfig, Settings

__all__ = [
    "Config",
    "ConfigError",
    "Limits",
    "ModelRule",
    "ScopeConfig",
    "Settings",
    "check_config",
    "load_config",
    "parse_config",
]
