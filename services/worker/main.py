"""`appliance worker`: Huey's consumer for the appliance's jobs, in the foreground.

SIGTERM (or SIGINT) stops it after the running jobs finish, or after SHUTDOWN_TIMEOUT_S;
a job cut off then is marked failed ("interrupted") at the next start. With a health
address it answers GET /healthz: 200 while its worker threads are alive, else 503, with
the queue's length either way.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from appliance import jobs
from appliance.db import open_db
from appliance.errors import ApplianceError
from appliance.home import state_db_path
from services.gateway.runtime import GatewayRuntime
from services.gateway.tracing import tracer_provider
from services.worker.queue import JobQueue
from services.worker.runner import JobRunner

SHUTDOWN_TIMEOUT_S = 30.0  # keep the service manager's stop timeout above it
POLL_MAX_S = 1.0  # an idle consumer looks for new jobs at least this often


def run_worker(runtime: GatewayRuntime, *, threads: int = 1, health: tuple[str, int] | None = None,
               say: Callable[[str], None] = print) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = Path(runtime.home)
    db = open_db(state_db_path(home))
    try:
        failed, again = jobs.interrupt_running(db)
    finally:
        db.conn.close()
    for job_id in failed:
        say(f"job {job_id} was running when the worker stopped: marked failed")
    traces = tracer_provider(runtime.tracing, "worker") if runtime.tracing.otlp_endpoint else None
    runner = JobRunner(home, runtime.storage, runtime.models,
                       traces.get_tracer("appliance.worker") if traces is not None else None)
    queue = JobQueue(home, runner)
    runner.later, runner.enqueue = queue.enqueue_later, queue.enqueue
    for job_id in again:
        queue.enqueue(job_id)
        say(f"job {job_id} was running when the worker stopped: queued again, to resume from its last checkpoint")
    consumer = queue.huey.create_consumer(
        workers=threads, worker_type="thread", periodic=False, max_delay=POLL_MAX_S,
        graceful_signal="TERM", shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    server = _health_server(health, consumer, queue) if health else None
    say(f"worker for {home}: {threads} thread(s), queue {queue.huey.storage.filename}, object store "
        f"{runtime.storage.label if runtime.storage else 'none'}"
        + (f", health on http://{health[0]}:{health[1]}/healthz" if health else ""))
    try:
        consumer.run()
    finally:
        if server is not None:
            server.shutdown()
        if traces is not None:
            traces.shutdown()  # the spans still batched are sent
        say("worker stopped.")


def _health_server(address: tuple[str, int], consumer, queue: JobQueue) -> ThreadingHTTPServer:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/healthz":
                self.send_error(404)
                return
            alive = sum(consumer.environment.is_alive(t) for _, t in consumer.worker_threads)
            ok = alive == len(consumer.worker_threads)
            body = json.dumps({"status": "ok" if ok else "degraded", "threads_alive": alive,
                               "queued": queue.pending()}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # health probes would flood the log
            pass

    try:
        server = ThreadingHTTPServer(address, Health)
    except OSError as exc:
        raise ApplianceError(f"cannot answer health checks on {address[0]}:{address[1]}: {exc.strerror}; "
                             "choose another --health address") from None
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
