"""Rendered k3s manifests, run with `podman kube play`: podman stands in for k3s.

What podman 4.3 (Debian 12's) lacks is filled in here, and only that; every container,
command, environment, volume and image is the rendered manifests' own:
- Services and cluster DNS: each Service's name points at its pod's address (hostAliases).
- Secrets: created in podman's own format, a JSON map of base64 values (podman 4.3 stores a
  played Kubernetes Secret as YAML and then cannot read it back); a Secret mounted as a
  volume becomes a ConfigMap with the same data (podman 4.3 crashes on Secret volumes).
- Init containers: run first, each as a pod of its own on the same volumes (podman 4.3
  fails to remove a finished init container here, and leaves the pod half started).
- The deployment controller's container is left out: there is no Kubernetes API to call.
- Containers are not restarted (restartPolicy Never): podman restarts a failed one at once,
  with no back-off, and its output is lost with each restart; a test wants the first failure.
Probes do not run: podman schedules them with systemd timers, and there is no systemd here.

It is also the `Cluster` an upgrade drives (installer/upgrade_cluster.py), in kubectl's place.

The sandbox's own limits (no crun, no default ulimits) are set in containers.conf beside
this file, through CONTAINERS_CONF.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from appliance.errors import InstallError
from services.engines import kube

CONTAINERS_CONF = Path(__file__).with_name("containers.conf")


def podman(*args: str, stdin: bytes | None = None, check: bool = True) -> str:
    result = subprocess.run(["podman", *args], input=stdin, capture_output=True,
                            env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    if check and result.returncode:
        raise RuntimeError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr.decode()[-3000:]}")
    return result.stdout.decode()


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


class PodmanCluster:
    """The manifests in `folder`, played in order by play(); down() removes everything played."""

    def __init__(self, folder: Path, work: Path):
        self.folder, self.work = folder, work
        self.secrets = {d["metadata"]["name"]: d["stringData"] for d in load(folder / "10-secrets.yaml")}
        self.pods: list[str] = []
        self.deployments: dict[str, list[str]] = {}  # Deployment name -> its pods, init pods included
        self.volumes: set[str] = set()
        self.hosts: dict[str, str] = {}  # Service DNS name -> pod address

    def create_secrets(self) -> None:
        for name, data in self.secrets.items():
            flat = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
            podman("secret", "create", name, "-", stdin=json.dumps(flat).encode())

    def play(self, filename: str, timeout: float = 120) -> list[str]:
        """Play one manifest file's Deployments (and its ConfigMaps and volume claims); returns their pods."""
        docs = load(self.folder / filename)
        pods = []
        for doc in docs:  # a claim is a named volume to podman; kept when the file is played again
            if doc["kind"] == "PersistentVolumeClaim":
                name = doc["metadata"]["name"]
                if subprocess.run(["podman", "volume", "exists", name]).returncode:
                    podman("volume", "create", name)
                self.volumes.add(name)
        docs = [d for d in docs if d["kind"] != "PersistentVolumeClaim"]
        for doc in docs:
            if doc["kind"] != "Deployment":
                continue
            spec = doc["spec"]["template"]["spec"]
            spec["containers"] = [c for c in spec["containers"] if c["name"] != "controller"]
            spec["restartPolicy"] = "Never"
            configs = [d for d in docs if d["kind"] == "ConfigMap"]
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    name = volume.pop("secret")["secretName"]
                    volume["configMap"] = {"name": name}
                    configs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                                    "data": self.secrets[name]})
            if self.hosts:
                spec["hostAliases"] = [{"ip": ip, "hostnames": [host]} for host, ip in self.hosts.items()]
            owned = self.deployments.setdefault(doc["metadata"]["name"], [])
            for init in spec.pop("initContainers", []):
                owned.append(self._run_once(doc, init, configs, timeout))
            pods.append(self._play([*configs, doc]))
            owned.append(pods[-1])
        return pods

    def remove(self, deployment: str) -> None:
        """Delete a Deployment's pods (as `kubectl delete deployment` would), not its volumes."""
        for pod in self.deployments.pop(deployment):
            podman("pod", "rm", "--force", pod, check=False)

    def _run_once(self, deployment: dict, container: dict, configs: list[dict], timeout: float) -> str:
        """An init container: its own pod, on the Deployment's volumes, run until it exits 0; returns the pod."""
        spec = deployment["spec"]["template"]["spec"]
        name = f"{deployment['metadata']['name']}-{container['name']}"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {**{k: v for k, v in spec.items() if k != "containers"},
                        "restartPolicy": "Never", "containers": [container]}}
        self._complete(pod, configs, timeout)
        return name

    def _complete(self, pod: dict, configs: list[dict], timeout: float) -> str:
        """Play a Pod of one container and wait until it exits 0; its output."""
        name, container = pod["metadata"]["name"], pod["spec"]["containers"][0]["name"]
        self._play([*configs, pod])
        ctr = f"{name}-{container}"
        deadline = time.monotonic() + timeout
        while podman("inspect", ctr, "--format", "{{.State.Status}}").strip() != "exited":
            if time.monotonic() > deadline:
                raise InstallError(f"{ctr} still running after {timeout:g} s")
            time.sleep(0.5)
        code = podman("inspect", ctr, "--format", "{{.State.ExitCode}}").strip()
        logs = podman("logs", ctr, check=False)
        if code != "0":
            raise InstallError(f"{ctr} exited with {code}:\n{logs}")
        return logs

    def _play(self, docs: list[dict]) -> str:
        path = self.work / f"play-{len(self.pods)}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        podman("kube", "play", "--replace", str(path))
        pod = [d for d in docs if d["kind"] in ("Pod", "Deployment")][0]["metadata"]["name"]
        pod = pod if docs[-1]["kind"] == "Pod" else f"{pod}-pod-0"
        self.pods.append(pod)
        return pod

    def address(self, pod: str) -> str:
        infra = podman("pod", "inspect", pod, "--format", "{{.InfraContainerID}}").strip()
        return podman("inspect", infra, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}").strip()

    def serve(self, service: str, pod: str) -> None:
        """Cluster DNS for `service` (NAME.NAMESPACE.svc) in the pods played from now on. A pod
        whose containers all exited has no address left (podman refuses an empty host entry):
        an unroutable one stands in, as a Service with no ready pod answers nothing."""
        self.hosts[service] = self.address(pod) or "192.0.2.1"  # TEST-NET-1: routes nowhere

    def container(self, pod: str, name: str) -> str:
        return f"{pod}-{name}"

    def down(self) -> None:
        for pod in reversed(self.pods):
            podman("pod", "rm", "--force", pod, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "--force", volume, check=False)
        for name in self.secrets:
            podman("secret", "rm", name, check=False)

    # --- the Cluster an upgrade drives (installer/upgrade_cluster.py) -------------------

    def apply(self, folder: Path) -> None:
        """As `kubectl apply -f folder`: the engines first (their Services then name their pods), then the control pod."""
        self.folder = folder
        for path in sorted(folder.glob("40-engine-*.yaml")):
            for doc, pod in zip([d for d in load(path) if d["kind"] == "Deployment"], self.play(path.name)):
                service = kube.name("engine", doc["metadata"]["labels"]["appliance/model"])
                self.serve(f"{service}.{doc['metadata']['namespace']}.svc", pod)
        self.play("30-control.yaml")

    def wait_ready(self, folder: Path, timeout_s: float) -> None:
        """The control pod's /readyz (its readiness probe) answers 200, and no container of `folder`'s pods has exited."""
        port = next(c for d in load(folder / "30-control.yaml") if d["kind"] == "Deployment"
                    for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")["ports"][0]
        url = f"http://{self.address('control-pod-0')}:{port['containerPort']}/readyz"
        deadline = time.monotonic() + timeout_s
        while True:
            for pods in self.deployments.values():
                self._check_running(pods[-1])
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise InstallError(f"the control pod was not ready within {timeout_s:g} s")
            time.sleep(0.5)

    def _check_running(self, pod: str) -> None:
        for ctr in json.loads(podman("pod", "inspect", pod))["Containers"]:
            state = json.loads(podman("inspect", ctr["Id"]))[0]
            if ctr["Name"].endswith("-infra") or state["State"]["Status"] == "running":
                continue
            # podman 4.3's `podman logs` prints nothing for a played container that exited: read its k8s-file log.
            log = Path(state["HostConfig"]["LogConfig"]["Path"])
            lines = [line.split(" ", 3)[-1] for line in log.read_text(errors="replace").splitlines()] if log.exists() else []
            raise InstallError(f"container {ctr['Name']} {state['State']['Status']} with exit code "
                               f"{state['State']['ExitCode']}; its last lines:\n" + "\n".join(lines[-12:]))

    def gateway(self, argv: list[str]) -> str:
        try:
            return podman("exec", self.container("control-pod-0", "gateway"), *argv)
        except RuntimeError as exc:
            raise InstallError(str(exc)) from None

    def stop_control(self) -> None:
        self.remove("control")

    def delete(self, kind: str, name: str) -> None:
        if kind == "Deployment" and name in self.deployments:
            self.remove(name)  # the rest (Services, ConfigMaps, claims) podman never made as objects

    def run_pod(self, pod: dict) -> str:
        try:
            return self._complete(pod, [], 300)
        finally:
            podman("pod", "rm", "--force", pod["metadata"]["name"], check=False)
