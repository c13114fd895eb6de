"""What the gateway process is told at start: rendered from the profile by whoever deploys it.

`appliance up` writes it to $APPLIANCE_HOME/run/gateway.json (mode 0600: it holds the
engines' internal keys); a systemd or k3s deployment renders the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from appliance.config import (
    AlertsConfig,
    AuditConfig,
    AuthConfig,
    Balance,
    CacheConfig,
    CostConfig,
    GatewayConfig,
    RetentionConfig,
    RouteSpec,
    TracingConfig,
)
from appliance.files import write_new
from appliance.objectstore import ObjectStoreSettings


class ReplicaEndpoint(msgspec.Struct, kw_only=True):
    base_url: str  # OpenAI API root of the replica, e.g. http://127.0.0.1:41234/v1
    health_url: str | None = None  # answers 200 when ready; default: base_url + /models
    api_key: str | None = None
    api_key_env: str | None = None  # for remote upstreams: read the key from this variable
    slots: int | None = None  # requests the engine runs at once; None: not limited by the gateway

    def resolved_key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return self.api_key


class ServedModel(msgspec.Struct, kw_only=True):
    name: str
    engine: str
    replicas: list[ReplicaEndpoint]
    upstream_model: str | None = None  # name the engine knows the model by, if different
    embeddings: bool = False
    context_length: int | None = None  # tokens per sequence, where the profile says
    request_timeout_s: float = 300.0
    created: int = 0
    engine_params: list[str] = []  # engine-specific request fields forwarded as sent
    balance: Balance = "least_busy"  # how a replica is chosen (services/gateway/replicas.py)
    cache: CacheConfig | None = None  # the response cache (services/gateway/cache.py); None: off
    price_input_per_million: float | None = None  # unset: local models' cost comes from the hardware's
    price_output_per_million: float | None = None
    path: str | None = None  # a llamacpp model's GGUF file: a fine-tune may name the model as its base


class GatewayRuntime(msgspec.Struct, kw_only=True):
    home: str
    profile: str
    gateway: GatewayConfig
    models: list[ServedModel]
    storage: ObjectStoreSettings | None = None  # the object store of the registries
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    costs: CostConfig = msgspec.field(default_factory=CostConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    routes: list[RouteSpec] = []  # the profile's; /admin/routes adds and overrides (appliance/routes.py)
    # The config of the litestream that replicates the state, as the gateway reads it (GET
    # /admin/system reports the replica's lag from it); None: the state is not replicated.
    litestream_config: str | None = None
    # Where GET /admin/system takes the GPUs from. None: NVML in the gateway itself (`appliance
    # up`, whose gateway has the machine's devices); else the file a GPU sampler writes
    # (services/gpus.py; systemd's appliance-gpu-sampler.service), the gateway having no devices.
    gpu_readings: str | None = None
    # Set where the gateway can read no GPU at all, and why (k3s: its pod has none); NVML is then not tried.
    no_gpus_reason: str | None = None


def write_runtime(runtime: GatewayRuntime, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_new(path, msgspec.json.format(msgspec.json.encode(runtime)))


def read_runtime(path: Path) -> GatewayRuntime:
    return decode_runtime(path.read_bytes())


def decode_runtime(raw: bytes) -> GatewayRuntime:
    """One written before the filesystem store (storage without a "kind") names an S3 store."""
    data = msgspec.json.decode(raw)
    if isinstance(data, dict) and isinstance(data.get("storage"), dict):
        data["storage"].setdefault("kind", "s3")
    return msgspec.convert(data, GatewayRuntime)
