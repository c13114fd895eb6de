"""The on-prem LLM appliance: core package (config, state, auth, metering, CLI)."""

__version__ = "0.1.0"
