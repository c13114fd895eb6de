"""The admin API: one controller per domain under /admin, every route behind the permission guard.

The guard answers 401 or 403 before a handler runs: the caller's role must hold the
permission that appliance/permissions.py gives the route (a route it does not name is
refused to everyone); each handler gets its caller as `actor`, for the audit log.
"""

from __future__ import annotations

from litestar import Router
from litestar.di import Provide

from services.gateway.admin import current_actor, requires_permission
from services.gateway.admin_alerts import AlertController
from services.gateway.admin_audit import AuditController
from services.gateway.admin_datasets import DatasetController
from services.gateway.admin_deployments import DeploymentController
from services.gateway.admin_evaluations import EvaluationController
from services.gateway.admin_experiments import ExperimentController, RunController
from services.gateway.admin_prompts import PromptController
from services.gateway.admin_request_logs import RequestLogController
from services.gateway.admin_tools import ToolController
from services.gateway.admin_jobs import JobController
from services.gateway.admin_keys import KeyController
from services.gateway.admin_models import ModelController
from services.gateway.admin_routes import RouteController
from services.gateway.admin_serving import ServingController
from services.gateway.admin_system import SystemController
from services.gateway.admin_teams import TeamController
from services.gateway.admin_uploads import UploadController
from services.gateway.admin_usage import UsageController
from services.gateway.admin_users import UserController

CONTROLLERS = [KeyController, ModelController, DeploymentController, RouteController, ServingController, SystemController,
               UploadController, DatasetController, JobController, AuditController, UserController, TeamController,
               UsageController, ExperimentController, RunController, EvaluationController, PromptController,
               ToolController, AlertController, RequestLogController]


def admin_router() -> Router:
    return Router(path="/admin", route_handlers=CONTROLLERS, guards=[requires_permission],
                  dependencies={"actor": Provide(current_actor)})
