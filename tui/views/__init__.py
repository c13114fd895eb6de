"""The views that `:` jumps to, with their short names (as k9s has `:po` for pods)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class Command:
    name: str
    aliases: tuple[str, ...]
    description: str
    target: str  # "module:ViewClass", imported when first opened

    @property
    def view(self):
        module, _, cls = self.target.partition(":")
        return getattr(import_module(module), cls)

    @staticmethod
    def find(name: str) -> Command | None:
        name = name.strip().lower()
        return next((c for c in COMMANDS if name == c.name or name in c.aliases), None)


COMMANDS = [
    Command("dashboard", ("dash", "d"), "health, traffic, models and replicas, GPUs, backup", "tui.views.dashboard:Dashboard"),
    Command("models", ("mo", "registry"), "the model registry: versions, cards, compare, deploy", "tui.views.models:ModelsView"),
    Command("deployments", ("dp", "deploy"), "deployed model versions: undeploy", "tui.views.models:DeploymentsView"),
    Command("routes", ("rt",), "routes: canary weights, fallbacks, shadows", "tui.views.routes:RoutesView"),
    Command("datasets", ("ds",), "the dataset registry: versions, quality, PII, diff", "tui.views.datasets:DatasetsView"),
    Command("jobs", ("j",), "background jobs: follow a log and its metrics, fine-tune, evaluate, cancel",
            "tui.views.jobs:JobsView"),
    Command("runs", ("experiments", "exp"), "fine-tuning and evaluation runs: compare two, tags",
            "tui.views.experiments:RunsView"),
    Command("keys", ("k",), "API keys: create, revoke, limits and budgets with spend", "tui.views.keys:KeysView"),
    Command("users", ("u",), "users: create, role, password, delete", "tui.views.people:UsersView"),
    Command("teams", ("t",), "teams: members, limits and budgets", "tui.views.people:TeamsView"),
    Command("usage", ("us", "cost"), "usage and cost by team, user, key, model and route, per hour, day or month",
            "tui.views.usage:UsageView"),
    Command("alerts", ("al",), "alerts firing, pending and resolved, where they went; the rules", "tui.views.alerts:AlertsView"),
    Command("logs", ("lg", "requests"), "request logs (masked): find a request by its id", "tui.views.request_logs:RequestLogsView"),
    Command("policies", ("pol",), "the PII, deny-list and injection policies of keys and teams", "tui.views.policies:PoliciesView"),
    Command("audit", ("au",), "the audit log: filter, verify the chain", "tui.views.audit:AuditView"),
]
