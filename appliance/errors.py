"""One exception hierarchy for the whole appliance.

The gateway turns these into OpenAI error objects, the CLI into a message and a
non-zero exit code.
"""

from __future__ import annotations

import math
import re


class ApplianceError(Exception):
    """Base error: carries what the HTTP edge needs to build an OpenAI error object."""

    status = 500
    type = "internal_error"
    code: str | None = None
    request_id: str | None = None  # set by the gateway once a request id exists

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}


class ProfileError(ApplianceError):
    """A profile file is missing, unreadable or invalid."""

    code = "invalid_profile"


class ProcessFailed(ApplianceError):
    """A supervised process (engine, gateway) did not start or become ready."""

    code = "process_failed"


class StateError(ApplianceError):
    """The state database is missing, newer than this code, or otherwise unusable."""

    code = "state_error"


class InvalidRequest(ApplianceError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(ApplianceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ApplianceError):
    status = 403
    type = "permission_error"
    code = "insufficient_role"


class ModelNotAllowed(PermissionDenied):
    """The caller's key or team may not use this model (its `models` limit)."""

    code = "model_not_allowed"


class NotFound(ApplianceError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model '{model}' does not exist or is not served here.", param="model")


class PayloadTooLarge(ApplianceError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ApplianceError):
    """The client did not send its request body in time (gateway.body_timeout_s)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class ServiceUnavailable(ApplianceError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_replica"

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Overloaded(ServiceUnavailable):
    """A model's engines are busy and its wait queue full: shed at once (services/gateway/queueing.py)."""

    status = 429
    type = "overloaded"
    code = "model_overloaded"


class QueueTimeout(ServiceUnavailable):
    """A request waited a model's max_wait_s for an engine slot."""

    code = "queue_timeout"


class RateLimited(ApplianceError):
    """A rate limit (requests or tokens per minute, parallel requests) of a key or team is reached.
    `limits` holds OpenAI's x-ratelimit-* headers; Retry-After says when to try again."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, limits: dict[str, str] | None = None,
                 type: str = "requests"):
        super().__init__(message)
        self.type = type  # requests or tokens, as OpenAI says
        self.retry_after = retry_after
        self.limits = limits or {}
        # Room leased by other gateway workers stands in the way too: it is given back within a
        # second or so (appliance/limits.py), and this request may fit then.
        self.held = False

    def headers(self) -> dict[str, str]:
        return {**self.limits, "Retry-After": str(max(1, math.ceil(self.retry_after)))}


class QuotaExceeded(ApplianceError):
    """A token or cost budget of a key or team is spent for its period."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, *, retry_after: float, held: bool = False):
        super().__init__(message)
        self.retry_after = retry_after  # until the period ends
        # Only room held by requests in flight (and gateway workers' leases) stands in the way: once
        # they settle to their real usage (usually less than their worst case) this request may fit.
        self.held = held

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class PolicyViolation(ApplianceError):
    """A request (or answer) broke a PII, content or prompt-injection policy; `param` names where."""

    status = 400
    type = "invalid_request_error"
    code = "policy_violation"

    def __init__(self, message: str, *, rule: str, param: str | None = None):
        super().__init__(message, param=param)
        self.rule = rule  # e.g. pii.kr_rrn, content.deny, injection.ignore_instructions


class EngineError(ApplianceError):
    status = 502
    type = "engine_error"
    code = "engine_failed"


class DeliveryFailed(ApplianceError):
    """An alert channel's server (a webhook, an SMTP server) did not take a message."""

    status = 502
    type = "delivery_error"
    code = "delivery_failed"


class EngineTimeout(ApplianceError):
    status = 504
    type = "timeout"
    code = "engine_timeout"


class EngineRejected(ApplianceError):
    """The engine refused a request as invalid (for example, a prompt over its context)."""

    type = "invalid_request_error"
    code = "engine_rejected"

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message)
        self.status = status


class MethodNotAllowed(ApplianceError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ClientGone(ApplianceError):
    """The client closed its connection before the answer was sent."""

    status = 499
    type = "client_closed_request"
    code = "client_closed_request"


class TrainingNotInstalled(ApplianceError):
    """This install has no fine-tuning stack (the `train` extra)."""

    status = 503
    type = "service_unavailable"
    code = "training_not_installed"


class StorageUnavailable(ApplianceError):
    """The object store is not configured, unreachable, or refused an operation."""

    status = 503
    type = "service_unavailable"
    code = "object_store_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class ChecksumMismatch(InvalidRequest):
    """Content does not have the SHA-256 it was announced with."""

    code = "checksum_mismatch"


class ModelFileError(InvalidRequest):
    """A model file or directory is corrupt, truncated or of an unknown format."""

    code = "invalid_model"


class Conflict(ApplianceError):
    """The change conflicts with the current state (e.g. deleting a deployed model)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class BackupError(ApplianceError):
    """Replication is not configured or a restore cannot proceed."""

    code = "backup_error"


class InstallError(ApplianceError):
    """The installer, a renderer or a bundle met bad input or a failed step."""

    code = "install_error"


class PlanError(ApplianceError):
    """A model cannot be placed on the machine (or cluster) it is planned for."""

    code = "does_not_fit"


class DatasetError(InvalidRequest):
    """A dataset file is malformed, of an unknown format, or cannot be split or compared as asked."""

    code = "invalid_dataset"


_AT = re.compile(r" - at `\$(.*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def invalid_value(exc: Exception, prefix: str = "") -> InvalidRequest:
    """A msgspec ValidationError as an InvalidRequest naming the field (`prefix.field`)."""
    text = str(exc)
    match = _AT.search(text)
    param = ".".join(p for p in (prefix, match.group(1).lstrip(".") if match else "") if p) or None
    message = _AT.sub("", text)
    unknown = _UNKNOWN.search(text)
    if unknown and not param:  # at the top level; a nested one names the object that holds it
        return InvalidRequest(f"Unknown parameter '{unknown.group(1)}'.", param=unknown.group(1), code="unknown_parameter")
    missing = _MISSING.search(text)
    if missing:
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
        return InvalidRequest(f"Missing required parameter '{param}'.", param=param, code="missing_required_parameter")
    if param:
        message = f"Invalid value for '{param}': {message}"
    return InvalidRequest(message, param=param, code="invalid_value")
