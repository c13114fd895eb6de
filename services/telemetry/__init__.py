"""The telemetry helper: a process beside each gateway worker that makes and exports the
worker's trace spans and masks and writes its request logs, so that neither costs the
worker's CPU (services/gateway/telemetry.py is the worker's side)."""
