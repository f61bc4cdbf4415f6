"""Orchard's settings: one typed object read from the environment."""
from config.settings import Settings, SettingsError, load_settings

__all__ = ["Settings", "SettingsError", "load_settings"]
