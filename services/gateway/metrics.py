"""Prometheus metrics of the gateway, per model.

With several Granian workers, each worker is a process: the supervisor sets
PROMETHEUS_MULTIPROC_DIR and every worker's values are summed at scrape time. One
worker keeps its values in memory, which is cheaper per request.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)

GEN_AI_LABELS = ["gen_ai_request_model", "gen_ai_operation_name"]
# gen_ai.operation.name of each endpoint (the Responses API is a chat).
OPERATIONS = {"chat/completions": "chat", "completions": "text_completion", "embeddings": "embeddings",
              "responses": "chat"}


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        if multiprocess:
            MultiProcessCollector(self.registry)
        r = None if multiprocess else self.registry  # values live in the shared directory
        self.requests = Counter(
            "appliance_requests", "Requests answered, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"], registry=r,
        )
        self.errors = Counter(
            "appliance_errors", "Requests that ended in an error, by model and error type.",
            ["model", "endpoint", "type"], registry=r,
        )
        # Named as OpenTelemetry's GenAI semantic conventions name them (gen_ai.server.*), with its attributes as labels.
        self.latency = Histogram(
            "gen_ai_server_request_duration_seconds", "Time from request to the end of the answer.",
            GEN_AI_LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Time from request to the first token (streamed chunk).",
            GEN_AI_LABELS, buckets=TTFT_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds", "Time per output token after the first, of answers "
            "with two or more.", GEN_AI_LABELS, buckets=TPOT_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "appliance_tokens", "Tokens processed, by model and kind (prompt or completion).",
            ["model", "kind"], registry=r,
        )
        self.pii_masked = Counter(
            "appliance_pii_masked", "Personal data values masked in requests by a key's or team's policy, by detector.",
            ["kind"], registry=r,
        )
        self.policy_refusals = Counter(
            "appliance_policy_refusals", "Requests refused by a limit, budget or policy, by rule.", ["rule"], registry=r,
        )
        self.in_flight = Gauge(
            "appliance_requests_in_flight", "Requests being answered now.", ["model"], registry=r,
            multiprocess_mode="livesum",
        )
        self.healthy_replicas = Gauge(
            "appliance_replicas_healthy", "Engine replicas passing their health check.", ["model"], registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.replicas = Gauge(
            "appliance_replicas", "Engine replicas configured.", ["model"], registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.failed_replicas = Gauge(
            "appliance_replicas_failed",
            "Engine replicas marked failed after crashing max_crashes times within crash_window_s (/readyz says why).",
            ["model"], registry=r, multiprocess_mode="livemostrecent",
        )
        self.upstream_failures = Counter(
            "appliance_upstream_failures", "Attempts on an engine replica or remote upstream that failed before the "
            "answer started, by model and reason (HTTP, unreachable, dropped, timeout).", ["model", "reason"], registry=r,
        )
        self.retries = Counter(
            "appliance_retries", "Attempts after a request's first (another replica, or a route's next model), by "
            "the model tried.", ["model"], registry=r,
        )
        self.retries_refused = Counter(
            "appliance_retries_refused", "Retries not made because the retry budget was spent, by the model not tried.",
            ["model"], registry=r,
        )
        self.route_requests = Counter(
            "appliance_route_requests", "Requests for a route, by route and the model that answered; fallback says "
            "whether it was not the target drawn.", ["route", "model", "fallback"], registry=r,
        )
        self.breaker_state = Gauge(
            "appliance_breaker_state", "Circuit breaker of each replica: 0 closed, 1 half-open, 2 open.",
            ["model", "replica"], registry=r, multiprocess_mode="livemax",
        )
        self.queue_depth = Gauge(
            "appliance_queue_depth", "Requests waiting for an engine slot of a model.", ["model"], registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            "appliance_queue_wait_seconds", "Time requests to a model with limited slots waited for one.",
            ["model"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.shed = Counter(
            "appliance_shed", "Requests shed by a model's wait queue: model_overloaded (full, 429) or queue_timeout "
            "(waited queue.max_wait_s, 503).", ["model", "reason"], registry=r,
        )
        self.cache_requests = Counter(
            "appliance_cache_requests", "Deterministic requests to a model with a response cache, by result: hit, "
            "miss, refresh (Cache-Control: no-cache) or bypass (no-store).", ["model", "result"], registry=r,
        )
        self.cache_saved_tokens = Counter(
            "appliance_cache_saved_tokens", "Tokens the response cache's answers did not have to process.", ["model"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "appliance_cache_bytes", "Bytes held by a model's response cache (each worker's own).", ["model"],
            registry=r, multiprocess_mode="livesum",
        )
        self.shadow_requests = Counter(
            "appliance_shadow_requests", "Copies of a route's requests sent to its shadow model, by outcome: ok, "
            "error, or skipped (not served, busy, or remote for a caller kept on the appliance).",
            ["route", "model", "outcome"], registry=r,
        )
        self.usage_pending = Gauge(
            "appliance_usage_rows_pending", "Usage rows waiting to be written to the state database.", registry=r,
            multiprocess_mode="livesum",
        )
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        """A labelled child, cached: labels() is too slow to call on every request."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
