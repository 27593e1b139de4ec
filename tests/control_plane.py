"""A real Kubernetes control plane on loopback: etcd + kube-apiserver (+ controller manager).

The envtest convention of controller-runtime: the binaries come from the directory named by
``KUBEBUILDER_ASSETS`` (``kube-apiserver``, ``etcd``, optionally ``kube-controller-manager``).
Every start has a fresh etcd data directory, fresh certificates and free ports; nothing listens
beyond 127.0.0.1. Used by the real-apiserver test tier (``tests/realkube``) and the benchmark.

Without a kubelet or scheduler no Pod ever runs: Deployments and their pod templates exist
as objects only.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ASSETS_ENV = "KUBEBUILDER_ASSETS"
HOW_TO_GET_ASSETS = (
    f"no real control plane: set {ASSETS_ENV} to a directory holding kube-apiserver, etcd and"
    " (optionally) kube-controller-manager, e.g. `../shared/kube/unpack.sh DIR` (see"
    " ../shared/kube/README.md), `setup-envtest use -p path`, or a Kubernetes server release"
)


def find_assets() -> Path | None:
    """The KUBEBUILDER_ASSETS directory if it holds at least kube-apiserver and etcd."""
    raw = os.environ.get(ASSETS_ENV)
    if not raw:
        return None
    path = Path(raw)
    if all(os.access(path / name, os.X_OK) for name in ("kube-apiserver", "etcd")):
        return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


@dataclasses.dataclass
class _Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path


def _make_pki(directory: Path) -> _Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("zenml-operator-test-ca")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    serving_key = _key()
    serving = _cert(_name("kube-apiserver"), serving_key, ca_name, ca_key, server=True)
    admin_key = _key()
    admin = _cert(_name("admin", "system:masters"), admin_key, ca_name, ca_key)
    sa_key = _key()

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    pem = serialization.Encoding.PEM
    return _Pki(
        ca_cert=write("ca.crt", ca.public_bytes(pem)),
        ca_key=write("ca.key", _pem_key(ca_key)),
        serving_cert=write("apiserver.crt", serving.public_bytes(pem)),
        serving_key=write("apiserver.key", _pem_key(serving_key)),
        admin_cert=write("admin.crt", admin.public_bytes(pem)),
        admin_key=write("admin.key", _pem_key(admin_key)),
        sa_key=write("sa.key", _pem_key(sa_key)),
        sa_pub=write(
            "sa.pub",
            sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
        ),
    )


def kubeconfig(
    url: str,
    ca_cert: Path,
    *,
    token: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    user: str = "user",
) -> dict[str, Any]:
    """A kubeconfig document (certificates inlined, so it can be copied anywhere)."""
    user_entry: dict[str, Any] = {}
    if token is not None:
        user_entry["token"] = token
    if client_cert is not None and client_key is not None:
        user_entry["client-certificate-data"] = base64.b64encode(client_cert.read_bytes()).decode()
        user_entry["client-key-data"] = base64.b64encode(client_key.read_bytes()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": url,
                    "certificate-authority-data": base64.b64encode(ca_cert.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
        "current-context": "test",
    }


@dataclasses.dataclass
class ControlPlane:
    """A running control plane. `url` is the apiserver; the admin is in system:masters."""

    url: str
    workdir: Path
    pki: _Pki
    processes: dict[str, subprocess.Popen[bytes]]
    has_controller_manager: bool

    @property
    def ca_cert(self) -> Path:
        return self.pki.ca_cert

    def admin_kubeconfig(self) -> Path:
        path = self.workdir / "admin.kubeconfig"
        if not path.exists():
            doc = kubeconfig(
                self.url,
                self.pki.ca_cert,
                client_cert=self.pki.admin_cert,
                client_key=self.pki.admin_key,
                user="admin",
            )
            path.write_text(yaml.safe_dump(doc))
            path.chmod(0o600)
        return path

    def token_kubeconfig(self, token: str, name: str) -> Path:
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig(self.url, self.pki.ca_cert, token=token)))
        path.chmod(0o600)
        return path

    def admin_client_kwargs(self) -> dict[str, Any]:
        """Arguments for an httpx client acting as the cluster admin."""
        return {"base_url": self.url, "verify": _admin_ssl(self.pki)}

    def logs(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def _spawn(workdir: Path, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    log = (workdir / f"{name}.log").open("wb")
    # Its own process group: a Ctrl-C of the test run reaches us, not the children directly.
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ok(
    url: str, check: Any, *, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args[0]} exited with {proc.returncode}")
        try:
            if check(url):
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout}s: {last!r}")


def start_control_plane(
    assets: Path, workdir: Path, *, controller_manager: bool = True
) -> ControlPlane:
    """Start etcd, kube-apiserver and (when present) kube-controller-manager; wait for ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki = _make_pki(workdir / "pki")
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        data_dir = workdir / "etcd-data"
        shutil.rmtree(data_dir, ignore_errors=True)
        processes["etcd"] = _spawn(
            workdir,
            "etcd",
            [
                str(assets / "etcd"),
                "--name=test",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                "--log-level=warn",
            ],
        )
        _wait_ok(
            f"{etcd_url}/health",
            lambda u: httpx.get(u, timeout=1).json().get("health") == "true",
            timeout=30,
            what="etcd",
            procs=[processes["etcd"]],
        )
        url = f"https://127.0.0.1:{api_port}"
        # Every request with its user and response code: the tier checks the operator's own
        # requests against the chart's RBAC by reading it (no 403 allowed).
        audit_policy = workdir / "audit-policy.yaml"
        audit_policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n"
            "rules:\n- level: Metadata\n"
        )
        processes["kube-apiserver"] = _spawn(
            workdir,
            "kube-apiserver",
            [
                str(assets / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--endpoint-reconciler-type=none",
                # What OpenShift enables: blockOwnerDeletion needs rights on the owner.
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                f"--cert-dir={workdir / 'apiserver-certs'}",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={workdir / 'audit.log'}",
                "--audit-log-format=json",
                "--v=0",
            ],
        )
        ssl_ctx = _admin_ssl(pki)
        _wait_ok(
            f"{url}/readyz",
            lambda u: httpx.get(u, verify=ssl_ctx, timeout=2).text == "ok",
            timeout=90,
            what="kube-apiserver",
            procs=[processes["etcd"], processes["kube-apiserver"]],
        )
        plane = ControlPlane(
            url=url,
            workdir=workdir,
            pki=pki,
            processes=processes,
            has_controller_manager=False,
        )
        kcm = assets / "kube-controller-manager"
        if controller_manager and os.access(kcm, os.X_OK):
            plugins = workdir / "flexvolume"
            plugins.mkdir(exist_ok=True)
            processes["kube-controller-manager"] = _spawn(
                workdir,
                "kube-controller-manager",
                [
                    str(kcm),
                    f"--kubeconfig={plane.admin_kubeconfig()}",
                    f"--authentication-kubeconfig={plane.admin_kubeconfig()}",
                    f"--authorization-kubeconfig={plane.admin_kubeconfig()}",
                    "--controllers=*",
                    "--use-service-account-credentials=false",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                    f"--service-account-private-key-file={pki.sa_key}",
                    f"--root-ca-file={pki.ca_cert}",
                    f"--cluster-signing-cert-file={pki.ca_cert}",
                    f"--cluster-signing-key-file={pki.ca_key}",
                    "--authentication-skip-lookup=true",
                    f"--flex-volume-plugin-dir={plugins}",
                    f"--cert-dir={workdir / 'kcm-certs'}",
                ],
            )
            plane.has_controller_manager = True
        return plane
    except BaseException:
        for proc in processes.values():
            with contextlib.suppress(Exception):
                proc.kill()
        raise


def _admin_ssl(pki: _Pki) -> Any:
    import ssl

    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return context


@contextlib.contextmanager
def running_control_plane(assets: Path, workdir: Path) -> Iterator[ControlPlane]:
    plane = start_control_plane(assets, workdir)
    try:
        yield plane
    finally:
        plane.stop()
