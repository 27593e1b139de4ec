"""Start and stop a real ZenML server for the tests and the demo.

The server runs from its own virtual environment (`zenml[server]` is heavy and pins many
libraries), so this module only starts a subprocess and speaks HTTP: it never imports
`zenml`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sqlite3
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from zenml_operator.zenml_api.connection import no_cookie_jar
from zenml_operator.zenml_api.routes import API_PREFIX

ZENML_VERSION = "0.98.0"
_VENV_DIR = ".venv-zenml"
_DEFAULT_USER = "default"


def _candidate_roots() -> list[Path]:
    roots: list[Path] = []
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in (start, *start.parents):
            if (parent / "pyproject.toml").is_file() and parent not in roots:
                roots.append(parent)
                break
    return roots


def find_zenml_python() -> str:
    """The Python interpreter that has `zenml[server]` installed."""
    explicit = os.environ.get("ZENML_SERVER_PYTHON", "").strip()
    if explicit:
        if not Path(explicit).is_file():
            raise RuntimeError(f"ZENML_SERVER_PYTHON={explicit} does not exist")
        return explicit
    for root in _candidate_roots():
        python = root / _VENV_DIR / "bin" / "python"
        if python.is_file():
            return str(python)
    raise RuntimeError(
        "No Python with zenml[server] found. Set ZENML_SERVER_PYTHON, or create the "
        "virtual environment in the repository root:\n"
        f"  python -m venv {_VENV_DIR} && "
        f'{_VENV_DIR}/bin/pip install "zenml[server]=={ZENML_VERSION}"'
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _persistent_secret(data_dir: Path, name: str) -> str:
    # Generated once per data dir and reused, so a server restarted on the same database
    # keeps its admin password (only applied when the default user is first created) and
    # its JWT secret (so issued tokens stay valid), yet no constant is shared by all.
    path = data_dir / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


@dataclass
class ZenMLServer:
    url: str
    admin_password: str = field(repr=False)
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    # Served over TLS: the CA certificate (PEM file) its serving certificate chains to.
    ca_file: Path | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "zenml.db"

    @property
    def ca_pem(self) -> str | None:
        """The CA certificate (PEM text) clients must trust, or None for plain HTTP."""
        return self.ca_file.read_text() if self.ca_file is not None else None

    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client's `verify` needs to reach this server."""
        if self.ca_file is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_file))

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.resume()  # a paused (SIGSTOP) process would not act on SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections are accepted, never answered), as a
        stalled or partitioned server does. `resume` undoes it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def grant_admin(self, account_name: str) -> None:
        """TEST/DEMO ONLY: make a service account a server admin.

        ZenML OSS (no RBAC) lets only admins create/update/delete service accounts and
        API keys, and offers NO API to make a service account an admin (they are always
        created with is_admin=false; PUT /users/{id} does not find service accounts).
        This flips the flag in the server's SQLite database so the operator can run with
        a service account key as DESIGN.md intends; the server reads it per request.
        """
        with sqlite3.connect(self.db_path) as db:
            cursor = db.execute(
                "UPDATE user SET is_admin = 1 WHERE name = ? AND is_service_account = 1",
                (account_name,),
            )
            if cursor.rowcount != 1:
                raise RuntimeError(f"no service account named {account_name!r} in {self.db_path}")


def start_zenml_server(
    data_dir: Path,
    *,
    port: int | None = None,
    python: str | None = None,
    ready_timeout: float = 120.0,
    ssl_certfile: Path | None = None,
    ssl_keyfile: Path | None = None,
    ca_file: Path | None = None,
) -> ZenMLServer:
    """Start `uvicorn zenml.zen_server.zen_server_api:app` on loopback and wait for it.

    With `ssl_certfile` and `ssl_keyfile` it serves HTTPS (uvicorn's own TLS); `ca_file`
    is the CA that certificate chains to, trusted by the readiness wait and the helpers.
    """
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("ssl_certfile and ssl_keyfile go together")
    if ssl_certfile is not None and ca_file is None:
        raise ValueError("a TLS server needs the ca_file its certificate chains to")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    python = python or find_zenml_python()
    port = port or _free_port()
    scheme = "https" if ssl_certfile is not None else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    admin_password = _persistent_secret(data_dir, "admin_password")

    # Drop inherited ZENML_* (e.g. the operator's own ZENML_STORE_API_KEY) and Python
    # path settings of the operator's environment: the server has its own venv.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ZENML_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(
        {
            "ZENML_STORE_URL": f"sqlite:///{data_dir / 'zenml.db'}",
            "ZENML_CONFIG_PATH": str(data_dir),
            # Real authentication: `zenml login --local` runs NO_AUTH and accepts any key.
            "ZENML_SERVER_AUTH_SCHEME": "OAUTH2_PASSWORD_BEARER",
            "ZENML_SERVER_AUTO_ACTIVATE": "true",
            "ZENML_DEFAULT_USER_PASSWORD": admin_password,
            "ZENML_SERVER_JWT_SECRET_KEY": _persistent_secret(data_dir, "jwt_secret"),
            "ZENML_ANALYTICS_OPT_IN": "false",
        }
    )
    log_path = data_dir / "server.log"
    command = [
        python,
        "-m",
        "uvicorn",
        "zenml.zen_server.zen_server_api:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if ssl_certfile is not None and ssl_keyfile is not None:
        command += ["--ssl-certfile", str(ssl_certfile), "--ssl-keyfile", str(ssl_keyfile)]
    process = _spawn(command, env, data_dir, log_path)
    server = ZenMLServer(
        url,
        admin_password,
        data_dir,
        process,
        log_path,
        ca_file=Path(ca_file).resolve() if ca_file is not None else None,
    )
    try:
        _wait_ready(server, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _spawn(
    command: list[str], env: dict[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(server: ZenMLServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0, cookies=no_cookie_jar(), verify=server.verify()) as http:
        while True:
            code = server.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"ZenML server exited with code {code} before it was ready; "
                    f"last lines of {server.log_path}:\n{_log_tail(server.log_path)}"
                )
            try:
                if http.get(f"{server.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"ZenML server at {server.url} not ready after {timeout:.0f} s; "
                    f"last lines of {server.log_path}:\n{_log_tail(server.log_path)}"
                )
            time.sleep(0.25)


def create_service_account_with_key(
    server_url: str,
    admin_password: str,
    account_name: str,
    key_name: str = "default",
    *,
    verify: ssl.SSLContext | bool = True,
) -> str:
    """As the `default` admin user: create a service account (or reuse one of that name)
    and an API key for it; return the key value. `verify`: see `ZenMLServer.verify`.

    On ZenML OSS the account is NOT an admin, so its key cannot manage service accounts;
    see ZenMLServer.grant_admin.
    """
    base = server_url.rstrip("/")
    with httpx.Client(base_url=base, timeout=30.0, cookies=no_cookie_jar(), verify=verify) as http:
        login = http.post(
            f"{API_PREFIX}/login", data={"username": _DEFAULT_USER, "password": admin_password}
        )
        _check(login, "log in as the default user")
        headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
        created = http.post(
            f"{API_PREFIX}/service_accounts",
            json={"name": account_name, "description": "", "active": True},
            headers=headers,
        )
        if created.status_code == 409:
            created = http.get(f"{API_PREFIX}/service_accounts/{account_name}", headers=headers)
        _check(created, f"create service account {account_name!r}")
        account_id = created.json()["id"]
        key = http.post(
            f"{API_PREFIX}/service_accounts/{account_id}/api_keys",
            json={"name": key_name, "description": "bootstrap key"},
            headers=headers,
        )
        _check(key, f"create API key {key_name!r} for {account_name!r}")
        return str(key.json()["body"]["key"])


def _check(response: httpx.Response, action: str) -> None:
    if not response.is_success:
        # Status only: the body of a failed login or key call is not worth the risk.
        raise RuntimeError(f"could not {action}: HTTP {response.status_code}")
