"""One description of the running stack, used alike by `appliance up` (services/supervisor.py),
the systemd renderer and the k3s renderer: the gateway's command line and what each
profile model is served as."""

from __future__ import annotations

from appliance.config import GatewayConfig, ModelConfig, Profile
from services.gateway.runtime import ReplicaEndpoint, ServedModel


def gateway_argv(python: str, host: str, port: int, workers: int) -> list[str]:
    """The gateway: Granian on a Unix socket in the home, and each worker's door on host:port
    (services/gateway/launch.py builds Granian's command line from the runtime file)."""
    return [python, "-m", "services.gateway.launch", "--host", host, "--port", str(port), "--workers", str(workers)]


def served_model(model: ModelConfig, gateway: GatewayConfig, replicas: list[ReplicaEndpoint],
                 created: int) -> ServedModel:
    """What the gateway serves for a profile model, behind `replicas`."""
    return ServedModel(
        name=model.name, engine=model.engine, replicas=replicas, upstream_model=model.upstream_model,
        embeddings=model.embeddings,
        context_length=model.context_length if model.engine != "remote" else None,
        request_timeout_s=model.request_timeout_s or gateway.request_timeout_s,
        created=created, engine_params=model.engine_params, balance=model.balance, cache=model.cache,
        price_input_per_million=model.price_input_per_million, price_output_per_million=model.price_output_per_million,
        path=model.path if model.engine == "llamacpp" else None,
    )


def runtime_settings(profile: Profile) -> dict:
    """The profile's settings the gateway governs and routes with: GatewayRuntime's auth, costs,
    audit, retention, alerts, tracing and routes."""
    return {"auth": profile.auth, "costs": profile.costs, "audit": profile.audit, "retention": profile.retention,
            "alerts": profile.alerts, "tracing": profile.tracing, "routes": profile.routes}


def remote_endpoint(model: ModelConfig) -> ReplicaEndpoint:
    """A remote upstream's one endpoint: its key is read from the environment at run time."""
    return ReplicaEndpoint(base_url=model.base_url, api_key_env=model.api_key_env)
