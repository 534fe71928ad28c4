from limiterd.config.model import Config, Limits, ModelRule, ScopeConfig, Settings

__all__ = ["Config", "Limits", "ModelRule", "ScopeConfig", "Settings"]
