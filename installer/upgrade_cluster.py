"""`appliance upgrade --bundle FILE --manifests DIR`: a k3s cluster from the version its
manifests run to a bundle's, with the way back kept until the new one is ready.

DIR is the folder `appliance render k3s` wrote and `kubectl apply -f` applied: it holds
the Secrets (so every key) and, in the `cluster` ConfigMap, the nodes' inventories.

1. The bundle is verified and must carry the appliance image (import its archive on every
   node first). A bundle whose SHA-256 is in DIR/bundle.txt changes nothing.
2. The bundle's profile, with the cluster's k3s settings and the bundle's image, is planned
   on the same nodes and rendered into a copy of DIR (DIR.next), so the Secrets carry over
   and every pod template names the new image. The render is this appliance's code: run
   the upgrade with the new version's `appliance`.
3. The control pod copies its databases into a snapshot on the state volume
   (`appliance backup snapshot`, SQLite's online backup).
4. DIR.next is applied: the control pod is replaced (Recreate), and its new gateway
   migrates the databases when it opens them; engine Deployments roll. The health check
   passes once every Deployment is ready (the gateway's readiness is /readyz: every
   model served) and no table that only grows holds fewer rows than the snapshot.
5. A failure after step 3 rolls back: the control Deployment is scaled to nothing, a pod
   of the old image puts the snapshot back on the state volume, what only DIR.next has is
   deleted and DIR is applied again. On success what only DIR had is deleted, DIR becomes
   DIR.previous and DIR.next becomes DIR.

The cluster is reached through `Cluster`: kubectl in the product (`Kubectl`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import msgspec
import yaml

from appliance import __version__
from appliance.errors import ApplianceError, InstallError
from services.engines import kube

RECORD = "bundle.txt"  # in the manifests folder: the bundle they were rendered from (YAML; kubectl skips .txt)
CONTROL = "30-control.yaml"
HOME = "/var/lib/appliance"  # APPLIANCE_HOME in the control pod (installer/k3s.py)


class Cluster(Protocol):
    """What an upgrade asks of the cluster."""

    def apply(self, folder: Path) -> None:
        """Apply every manifest in `folder`."""

    def wait_ready(self, folder: Path, timeout_s: float) -> None:
        """Return once every Deployment of `folder` is ready; raise InstallError saying why not."""

    def gateway(self, argv: list[str]) -> str:
        """Run argv in the control pod's gateway container; its output."""

    def stop_control(self) -> None:
        """Scale the control Deployment to nothing and wait until its pod is gone."""

    def run_pod(self, pod: dict) -> str:
        """Run a Pod to completion and remove it; its output. Raise InstallError if it fails."""

    def delete(self, kind: str, name: str) -> None:
        """Delete an object of the appliance's namespace (nothing if it does not exist)."""


def load_folder(folder: Path) -> list[dict]:
    """Every object of the manifests in `folder`, in file order."""
    return [doc for path in sorted(folder.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _find(docs: list[dict], kind: str, name: str) -> dict:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise InstallError(f"no {kind} {name!r} in the manifests: is this a folder `appliance render k3s` wrote?")


def namespaced(docs: list[dict]) -> set[tuple[str, str]]:
    """(kind, name) of the objects in the appliance's namespace (the device plugin's are in kube-system)."""
    return {(d["kind"], d["metadata"]["name"]) for d in docs
            if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "kube-system"}


def rollout_order(docs: list[dict]) -> list[dict]:
    """What must be ready, in order: MinIO, the engines, then the control pod."""
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")
                 and d["metadata"].get("namespace") != "kube-system"]
    return sorted(workloads, key=lambda d: (d["kind"] != "StatefulSet", d["metadata"]["name"] == "control"))


def restore_pod(control: dict, snapshot: str) -> dict:
    """A pod of the control Deployment's image that puts `snapshot` back on the state volume."""
    spec = control["spec"]["template"]["spec"]
    gateway = next(c for c in spec["containers"] if c["name"] == "gateway")
    state = next(v for v in spec["volumes"] if v["name"] == "state")
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": kube.meta("upgrade-rollback", control["metadata"].get("namespace"),
                              kube.labels("upgrade-rollback", "control")),
        "spec": {
            "restartPolicy": "Never",
            "securityContext": spec.get("securityContext", {}),
            "containers": [{
                "name": "restore",
                **{k: gateway[k] for k in ("image", "imagePullPolicy") if k in gateway},
                "command": ["appliance", "backup", "restore-snapshot", snapshot, "--home", HOME],
                "volumeMounts": [m for m in gateway["volumeMounts"] if m["name"] == "state"],
            }],
            "volumes": [state],
        },
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ClusterUpgrade:
    def __init__(self, cluster: Cluster, say, health_timeout_s: float):
        self.cluster, self.say, self.health_timeout_s = cluster, say, health_timeout_s

    def run(self, bundle: Path, manifests: Path) -> str:
        from installer.bundle import unpack_bundle, verify_bundle

        manifests = manifests.absolute()
        docs = load_folder(manifests)
        control = _find(docs, "Deployment", "control")
        self.say(f"verifying {bundle} ...")
        manifest = verify_bundle(bundle)
        if not manifest.images:
            raise InstallError(f"{bundle.name} carries no appliance image: build it for a cluster profile "
                               "(appliance bundle build --image)")
        digest = _sha256(bundle)
        record = self._record(manifests)
        old = self.cluster.gateway(["appliance", "--version"]).strip().rsplit(" ", 1)[-1]
        if record.get("sha256") == digest:
            return f"nothing to do: the cluster runs appliance {old} from this bundle ({digest[:12]}…) already"
        (image, member), = manifest.images.items()
        self.say(f"upgrading the cluster's appliance {old} to {manifest.appliance_version}; its image {image} "
                 f"must be on every node ({member} of the bundle: k3s ctr images import)")
        if __version__ != manifest.appliance_version:
            self.say(f"note: this is appliance {__version__}, so its code renders the manifests of "
                     f"{manifest.appliance_version}; run the new version's appliance to get that version's manifests")
        following = manifests.with_name(manifests.name + ".next")
        with tempfile.TemporaryDirectory(prefix="appliance-upgrade.") as tmp:
            staging = unpack_bundle(bundle, Path(tmp) / "bundle")
            self._render(staging, image, _find(docs, "ConfigMap", "cluster"), manifests, following)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        snapshot = f"{HOME}/backups/upgrade-{stamp}"
        self.cluster.gateway(["appliance", "backup", "snapshot", snapshot])
        self.say(f"took a snapshot of the databases: {snapshot} on the state volume")
        start = time.monotonic()
        try:
            self.say(f"applying {following} ...")
            self.cluster.apply(following)
            self.cluster.wait_ready(following, self.health_timeout_s)
            kept = self.cluster.gateway(["appliance", "backup", "check-rows", snapshot]).strip()
        except BaseException as exc:  # an error, or Ctrl-C: never leave a half-upgraded cluster
            reason = exc.message if isinstance(exc, ApplianceError) else (
                "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}")
            self._roll_back(manifests, following, control, snapshot, reason)
            raise InstallError(f"the upgrade to {manifest.appliance_version} failed, so the cluster was rolled back "
                               f"to {old} (the manifests in {manifests}, the databases from {snapshot}; "
                               f"the new render stays in {following}): {reason}") from None
        seconds = time.monotonic() - start
        for kind, name in sorted(namespaced(docs) - namespaced(load_folder(following))):
            self.cluster.delete(kind, name)  # what the new render no longer has (a model the profile dropped)
        (following / RECORD).write_text(yaml.safe_dump({
            "sha256": digest, "appliance_version": manifest.appliance_version, "image": image,
            "upgraded_at": datetime.now(timezone.utc).isoformat()}, sort_keys=False))
        previous = manifests.with_name(manifests.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        manifests.rename(previous)
        following.rename(manifests)
        return "\n".join([
            f"upgraded the cluster's appliance {old} to {manifest.appliance_version}",
            f"  health check:  passed in {seconds:.0f} s (every Deployment of the render ready)",
            f"  databases:     migrated; {kept.removeprefix('all ').removesuffix(' of the snapshot kept')} kept",
            f"  backup:        {snapshot} on the state volume",
            f"  manifests:     {manifests} (the previous render: {previous})",
        ])

    def _render(self, staging: Path, image: str, cluster_map: dict, manifests: Path, following: Path) -> None:
        """The bundle's profile, with the cluster's k3s settings and the bundle's image, planned
        on the render's nodes, into a copy of the manifests."""
        from appliance.config import load_profile
        from appliance.planning.engine_builds import check_gpu_offload
        from appliance.planning.planner import make_plan
        from installer.k3s import render_k3s
        from services.engines.kube_controller import ClusterSpec

        spec = msgspec.json.decode(cluster_map["data"]["cluster.json"], type=ClusterSpec)
        profile = yaml.safe_load((staging / "profile.yaml").read_text(encoding="utf-8"))
        # The cluster's own k3s settings (namespace, storage, volume sizes: a claim cannot change), the new image.
        profile["k3s"] = {**msgspec.to_builtins(spec.k3s), "image": image}
        for model in profile.get("models", []):  # the bundle's models, where it was unpacked: read to size them
            if model.get("path") and not Path(model["path"]).is_absolute() and "://" not in model["path"]:
                model["path"] = str(staging / model["path"])
        path = staging / "profile.abs.yaml"
        path.write_text(yaml.safe_dump(profile), encoding="utf-8")
        loaded = load_profile(str(path))
        plan = make_plan(loaded, spec.inventories, whole_gpus=True)
        check_gpu_offload(plan)
        shutil.rmtree(following, ignore_errors=True)
        shutil.copytree(manifests, following)
        (following / RECORD).unlink(missing_ok=True)
        render_k3s(loaded, plan, following, spec.inventories)
        self.say(f"rendered {profile.get('name')} for {len(spec.inventories)} node(s) into {following}")

    def _roll_back(self, manifests: Path, following: Path, control: dict, snapshot: str, reason: str) -> None:
        self.say("rolling back ...")
        steps = [
            ("stopping the control pod", self.cluster.stop_control),
            (f"putting the snapshot {snapshot} back", lambda: self.cluster.run_pod(restore_pod(control, snapshot))),
            *((f"deleting {kind} {name} (only in the new render)", lambda k=kind, n=name: self.cluster.delete(k, n))
              for kind, name in sorted(namespaced(load_folder(following)) - namespaced(load_folder(manifests)))),
            (f"applying {manifests}", lambda: self.cluster.apply(manifests)),
        ]
        for what, step in steps:
            try:
                step()
            except BaseException as exc:
                detail = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
                raise InstallError(
                    f"the upgrade failed ({reason}), and so did its roll-back, at {what}: {detail}. Finish it by "
                    f"hand: scale deployment/control to 0, run `appliance backup restore-snapshot {snapshot}` in a pod "
                    f"of the old image on the state volume, then kubectl apply -f {manifests}") from None
        try:
            self.cluster.wait_ready(manifests, self.health_timeout_s)
        except InstallError as exc:
            self.say(f"the previous version is not ready yet either: {exc.message}")

    @staticmethod
    def _record(manifests: Path) -> dict:
        try:
            return yaml.safe_load((manifests / RECORD).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}


class Kubectl:
    """The cluster through kubectl (on a k3s server: `k3s kubectl`)."""

    def __init__(self, command: str, namespace: str):
        self.command, self.namespace = shlex.split(command), namespace

    def _run(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        done = subprocess.run([*self.command, *args], input=stdin, capture_output=True, text=True)
        if check and done.returncode:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise InstallError(f"{shlex.join(['kubectl', *args])} failed (exit {done.returncode}):\n{tail}")
        return done.stdout

    def apply(self, folder: Path) -> None:
        self._run("apply", "-f", str(folder))  # no -n: the device plugin's objects are in kube-system

    def wait_ready(self, folder: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for workload in rollout_order(load_folder(folder)):
            kind, name = workload["kind"], workload["metadata"]["name"]
            selector = ",".join(f"{k}={v}" for k, v in workload["spec"]["selector"]["matchLabels"].items())
            waiting = None
            while True:
                done = subprocess.run([*self.command, "-n", self.namespace, "rollout", "status",
                                       f"{kind.lower()}/{name}", "--timeout=5s"], capture_output=True, text=True)
                if done.returncode == 0:
                    break
                pods = json.loads(self._run("-n", self.namespace, "get", "pods", "-l", selector, "-o", "json"))["items"]
                for problem in filter(None, map(kube.pod_problem, pods)):
                    if problem.fatal:
                        raise InstallError(f"{kind} {name} is not ready: {problem.message}")
                    waiting = problem.message  # unschedulable: an old pod may still hold the GPU
                if time.monotonic() > deadline:
                    last = waiting or (done.stdout + done.stderr).strip()[-500:]
                    raise InstallError(f"{kind} {name} was not ready within {timeout_s:g} s (--health-timeout): {last}")

    def gateway(self, argv: list[str]) -> str:
        return self._run("-n", self.namespace, "exec", "deployment/control", "-c", "gateway", "--", *argv)

    def stop_control(self) -> None:
        self._run("-n", self.namespace, "scale", "deployment/control", "--replicas=0")
        selector = "app.kubernetes.io/name=control,app.kubernetes.io/component=control"
        self._run("-n", self.namespace, "wait", "--for=delete", "pod", "-l", selector, "--timeout=300s", check=False)
        if self._run("-n", self.namespace, "get", "pods", "-l", selector, "-o", "name").strip():
            raise InstallError("the control pod did not stop within 300 s")

    def run_pod(self, pod: dict) -> str:
        name = pod["metadata"]["name"]
        self._run("-n", self.namespace, "delete", "pod", name, "--ignore-not-found")
        self._run("apply", "-f", "-", stdin=json.dumps(pod))
        try:
            deadline = time.monotonic() + 300
            phase = ""
            while phase not in ("Succeeded", "Failed"):
                if time.monotonic() > deadline:
                    raise InstallError(f"pod {name} did not finish within 300 s (phase {phase or 'unknown'})")
                time.sleep(2)
                phase = self._run("-n", self.namespace, "get", "pod", name, "-o", "jsonpath={.status.phase}").strip()
            logs = self._run("-n", self.namespace, "logs", name, check=False)
            if phase == "Failed":
                raise InstallError(f"pod {name} failed:\n{logs}")
            return logs
        finally:
            self._run("-n", self.namespace, "delete", "pod", name, "--wait=false", check=False)

    def delete(self, kind: str, name: str) -> None:
        self._run("-n", self.namespace, "delete", kind.lower(), name, "--ignore-not-found")
