"""The admin API: one controller per domain under /admin, every route behind the role guard.

Every call needs an admin or operator key (the guard answers 401 or 403 before a
handler runs); each handler gets its caller as `actor`, for the audit log.
"""

from __future__ import annotations

from litestar import Router
from litestar.di import Provide

from services.gateway.admin import current_actor, requires_manager
from services.gateway.admin_audit import AuditController
from services.gateway.admin_datasets import DatasetController
from services.gateway.admin_deployments import DeploymentController
from services.gateway.admin_jobs import JobController
from services.gateway.admin_keys import KeyController
from services.gateway.admin_models import ModelController
from services.gateway.admin_uploads import UploadController

CONTROLLERS = [KeyController, ModelController, DeploymentController, UploadController, DatasetController, JobController,
               AuditController]


def admin_router() -> Router:
    return Router(path="/admin", route_handlers=CONTROLLERS, guards=[requires_manager],
                  dependencies={"actor": Provide(current_actor, sync_to_thread=False)})
