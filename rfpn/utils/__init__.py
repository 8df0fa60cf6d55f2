"""Small helpers shared by rfpn's command-line tools."""
from .cli import UsageError, check_registered_datasets, load_config, run_cli

__all__ = ["UsageError", "check_registered_datasets", "load_config", "run_cli"]
