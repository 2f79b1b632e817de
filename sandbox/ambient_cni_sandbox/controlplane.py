"""The sandbox's real control plane: etcd, kube-apiserver, kube-controller-manager.

All three listen on loopback only, on free ports picked at start. The API
server authenticates with client certificates and service-account tokens and
authorizes with RBAC, like a real cluster; etcd keeps its data on tmpfs.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import pki
from .ports import free_port
from .processes import spawn_daemon, terminate
from .topology import API_ENDPOINT_IPS, KUBERNETES_SERVICE_IP, SERVICE_CIDR

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 90.0


class ControlPlaneError(RuntimeError):
    """A component did not become healthy; the message carries the tail of its log."""


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int

    @staticmethod
    def pick() -> Ports:
        return Ports(free_port(), free_port(), free_port(), free_port())


# Writes only (reads would flood the log): enough to count who changed what.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]}]},
        {
            "level": "None",
            "resources": [
                {"group": "", "resources": ["events"]},
                {"group": "events.k8s.io", "resources": ["events"]},
            ],
        },
        {"level": "Metadata", "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
        {"level": "None"},
    ],
}


class ControlPlane:
    """Certificates, kubeconfigs and the three processes of one sandbox."""

    def __init__(
        self,
        *,
        sandbox: str,
        state_dir: Path,
        etcd_data_dir: Path,
        bin_dir: Path,
        apiserver_profiling: bool = False,
    ):
        self.sandbox = sandbox
        self.apiserver_profiling = apiserver_profiling
        self.state_dir = state_dir
        self.etcd_data_dir = etcd_data_dir
        self.bin_dir = bin_dir
        self.pki_dir = state_dir / "pki"
        self.log_dir = state_dir / "logs"
        self.kubeconfig = state_dir / "kubeconfig"
        self.audit_log = self.log_dir / "audit.log"
        self._controller_kubeconfig = state_dir / "controller-manager.kubeconfig"

    # -- files ---------------------------------------------------------------

    def write_credentials(self, ports: Ports) -> None:
        """Generate the CA, certificates, service-account keys and kubeconfigs."""
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        self.pki_dir.chmod(0o700)
        ca = pki.new_ca(f"ambient-cni sandbox {self.sandbox} CA")
        pki.write_pair(ca, self.pki_dir, "ca")
        serving = pki.issue(
            ca,
            "kube-apiserver",
            server=True,
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ip_addresses=("127.0.0.1", KUBERNETES_SERVICE_IP, *API_ENDPOINT_IPS.values()),
        )
        pki.write_pair(serving, self.pki_dir, "apiserver")
        pki.write_service_account_keys(self.pki_dir)
        # The aggregation layer's front proxy: its own CA, as kubeadm sets it up.
        front_proxy_ca = pki.new_ca(f"ambient-cni sandbox {self.sandbox} front-proxy CA")
        pki.write_pair(front_proxy_ca, self.pki_dir, "front-proxy-ca")
        pki.write_pair(
            pki.issue(front_proxy_ca, "front-proxy-client", client=True),
            self.pki_dir,
            "front-proxy-client",
        )
        admin = pki.issue(ca, "kubernetes-admin", organization="system:masters", client=True)
        kcm = pki.issue(ca, "system:kube-controller-manager", client=True)
        server = f"https://127.0.0.1:{ports.apiserver}"
        write_kubeconfig(self.kubeconfig, server, ca, admin, user="admin", cluster=self.sandbox)
        write_kubeconfig(
            self._controller_kubeconfig,
            server,
            ca,
            kcm,
            user="kube-controller-manager",
            cluster=self.sandbox,
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))

    # -- processes -----------------------------------------------------------

    def start(self, ports: Ports) -> dict[str, int]:
        """Start etcd, then the API server, then the controller manager; each must be healthy."""
        pids: dict[str, int] = {}
        self.etcd_data_dir.mkdir(parents=True, exist_ok=True)
        self.etcd_data_dir.chmod(0o700)
        etcd = self._spawn("etcd", self._etcd_args(ports))
        pids["etcd"] = etcd.pid
        self._wait("etcd", etcd, lambda: _etcd_healthy(ports.etcd_client))
        apiserver = self._spawn("kube-apiserver", self._apiserver_args(ports))
        pids["kube-apiserver"] = apiserver.pid
        self._wait("kube-apiserver", apiserver, lambda: self._apiserver_ready(ports.apiserver))
        kcm = self._spawn("kube-controller-manager", self._controller_manager_args(ports))
        pids["kube-controller-manager"] = kcm.pid
        self._wait(
            "kube-controller-manager",
            kcm,
            lambda: _https_ok(ports.controller_manager, "/healthz", None),
        )
        return pids

    def _spawn(self, binary: str, args: list[str]) -> subprocess.Popen[bytes]:
        return spawn_daemon(
            [str(self.bin_dir / binary), *args],
            sandbox=self.sandbox,
            log_path=self.log_dir / f"{binary}.log",
        )

    def _wait(self, name: str, proc: subprocess.Popen[bytes], healthy: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.returncode} during start; "
                    f"last lines of {self.log_dir / (name + '.log')}:\n{self.log_tail(name)}"
                )
            if healthy():
                return
            time.sleep(0.1)
        terminate([proc.pid])
        raise ControlPlaneError(
            f"{name} was not healthy within {START_TIMEOUT:.0f}s; "
            f"last lines of its log:\n{self.log_tail(name)}"
        )

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.log_dir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _apiserver_ready(self, port: int) -> bool:
        return _https_ok(port, "/readyz", self.pki_dir)

    # -- arguments -----------------------------------------------------------

    def _etcd_args(self, ports: Ports) -> list[str]:
        client = f"http://127.0.0.1:{ports.etcd_client}"
        peer = f"http://127.0.0.1:{ports.etcd_peer}"
        return [
            f"--name={self.sandbox}",
            f"--data-dir={self.etcd_data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.sandbox}={peer}",
            "--initial-cluster-state=new",
            # The data is on tmpfs and thrown away at `down`: fsync buys nothing.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_args(self, ports: Ports) -> list[str]:
        p = self.pki_dir
        return [
            f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            f"--tls-cert-file={p / 'apiserver.crt'}",
            f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--requestheader-client-ca-file={p / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={p / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={p / 'front-proxy-client.key'}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            # Endpoints may not hold loopback addresses, and nothing in the
            # sandbox reaches the API server through the kubernetes Service.
            "--endpoint-reconciler-type=none",
            f"--audit-policy-file={self.state_dir / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-maxsize=100",
            f"--profiling={str(self.apiserver_profiling).lower()}",
            "--v=1",
        ]

    def _controller_manager_args(self, ports: Ports) -> list[str]:
        p = self.pki_dir
        kubeconfig = self._controller_kubeconfig
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.controller_manager}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={p / 'sa.key'}",
            f"--root-ca-file={p / 'ca.crt'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}",
            f"--cluster-signing-key-file={p / 'ca.key'}",
            f"--cluster-name={self.sandbox}",
            "--profiling=false",
            "--v=1",
        ]


def _etcd_healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = response.read()
        conn.close()
    except OSError:
        return False
    try:
        return response.status == 200 and json.loads(body).get("health") == "true"
    except ValueError:
        return False


def _https_ok(port: int, path: str, pki_dir: Path | None) -> bool:
    """GET https://127.0.0.1:port/path, verifying the server against `pki_dir`'s CA if given."""
    if pki_dir is None:
        context = ssl._create_unverified_context()  # noqa: S323 - self-signed, loopback health check
    else:
        context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=context)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        conn.close()
    except OSError:
        return False
    return response.status == 200


def write_kubeconfig(
    path: Path, server: str, ca: pki.KeyPair, client: pki.KeyPair, *, user: str, cluster: str
) -> None:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": b64(ca.cert_pem())},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert_pem()),
                    "client-key-data": b64(client.key_pem()),
                },
            }
        ],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
