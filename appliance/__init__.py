"""The on-prem LLM appliance: core package (config, state, auth, metering, CLI)."""

from importlib.metadata import version as _version

__version__ = _version("appliance")  # one source: pyproject.toml, as installed
