"""`make demo`: the operator end to end on one machine, with no cluster.

Run from a checkout: `make demo` (options: `make demo DEMO_ARGS="--keep-running -v"`), which
is `.venv/bin/python -m zenml_devstack.demo`. Not part of the operator's wheel or image.

What is real and what is not (the demo says it at the start and at the end):
- the ZenML server is REAL: `zenml[server]` from `.venv-zenml`, on loopback, with password
  and API-key authentication on; every key the demo shows working was checked by it;
- the Kubernetes API is EMULATED in this process (kmock + `ClusterEmulator`): objects are
  stored and watched as on a cluster, but no controller runs, so Deployments never start pods.

Steps: start ZenML (fresh data every run, see `_fresh_data_dir`), give the operator its own
credential, start the emulated API and the operator in-process, apply `examples/*.yaml`,
wait for the ServiceAccounts to be Ready, prove that every Secret the operator wrote logs in
to ZenML as its account (once with the real `zenml` client, as a pod would), then delete the
ServiceAccounts and check that their deletionPolicy was applied.

`run_examples` is everything after the ZenML server: the tests call it with their own server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import kopf
import yaml

from zenml_operator import secrets as sec
from zenml_operator import zenml_api as zc
from zenml_operator.config import OperatorConfig
from zenml_operator.main import build_registry
from zenml_operator.models import GROUP, SERVER_KINDS, ServiceAccountSpec

Say = Callable[[str], None]

REAL_AND_EMULATED = (
    "  ZenML server:   REAL      zenml[server] on 127.0.0.1, password/API-key authentication on\n"
    "  Kubernetes API: EMULATED  in this process (kmock): no cluster needed, no pods ever run"
)
GRANT_ADMIN_WHY = (
    "grant_admin: ZenML OSS lets only admins manage service accounts and no API makes a"
    " service account admin, so the demo sets the flag in its own sqlite DB; on a real server"
    " give the operator an admin user (ZENML_STORE_USERNAME/ZENML_STORE_PASSWORD) or use"
    " ZenML Pro RBAC."
)
OPERATOR_ACCOUNT = "zenml-operator"
# Values like `ZENKEY_replace-me`: example credentials that no server would accept.
_PLACEHOLDER = re.compile(r"replace[-_]?me", re.IGNORECASE)
# Anything that looks like a key value, for masking text we did not write ourselves.
_KEY_VALUE = re.compile(re.escape(zc.API_KEY_PREFIX) + r"[A-Za-z0-9+/=_-]+")
# Written into the demo's ZenML data dir, so that a wipe never hits a directory it did not make.
_DATA_DIR_MARKER = ".zenml-operator-demo"
_REAL_CLIENT_SNIPPET = "from zenml.client import Client; print(Client().active_user.name)"
_NOISY_LOGGERS = ("kopf", "zenml_operator", "httpx", "aiohttp", "kmock", "asyncio")


def mask(value: str) -> str:
    """How a key value may appear in the output: never the value itself."""
    shown = f"{zc.API_KEY_PREFIX}****" if value.startswith(zc.API_KEY_PREFIX) else "****"
    return f"{shown} ({len(value)} chars)"


def mask_text(text: str) -> str:
    return _KEY_VALUE.sub(f"{zc.API_KEY_PREFIX}****", text)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclasses.dataclass
class DemoReport:
    checks: list[Check] = dataclasses.field(default_factory=list)
    # "ns/name" of each zenml.io resource -> (Ready status, reason).
    ready: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    # "ns/name" of each Secret written by the operator -> the ZenML user its key logs in as.
    logins: dict[str, str | None] = dataclasses.field(default_factory=dict)
    # What the real zenml client printed as `Client().active_user.name`, if it ran.
    real_client_user: str | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, what: str, ok: bool, detail: str = "") -> Check:
        check = Check(what, ok, detail)
        self.checks.append(check)
        return check


class _Timer:
    """Records how long a step took into `report.timings` (printed at the end)."""

    def __init__(self, report: DemoReport, name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> _Timer:
        self.start = time.monotonic()
        return self

    def __exit__(self, *_: object) -> None:
        self.report.timings[self.name] = time.monotonic() - self.start


def _ok(flag: bool) -> str:
    return "OK" if flag else "FAILED"


# --------------------------------------------------------------------------- the repository


def find_repo_root() -> Path:
    """The checkout that holds `crds/` and `examples/` (the demo needs both).

    Looked up from this file first (`operator/zenml_devstack/` of the checkout), then from the
    working directory.
    """
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in (start, *start.parents):
            if (parent / "crds").is_dir() and (parent / "examples").is_dir():
                return parent
    raise RuntimeError(
        "The demo needs the repository's crds/ and examples/ directories: run it from a"
        " checkout of zenml-operator (`make demo`)."
    )


def load_crds(crds_dir: Path) -> list[dict[str, Any]]:
    crds = []
    for path in sorted(crds_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds.append(doc)
    return crds


@dataclasses.dataclass
class Manifest:
    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def api_version(self) -> str:
        return str(self.doc.get("apiVersion", ""))

    @property
    def name(self) -> str:
        return str((self.doc.get("metadata") or {}).get("name", ""))

    @property
    def namespace(self) -> str | None:
        return (self.doc.get("metadata") or {}).get("namespace")

    def ref(self, default_namespace: str = "default") -> str:
        return f"{self.namespace or default_namespace}/{self.name}"


def load_examples(examples_dir: Path) -> list[Manifest]:
    manifests = []
    for path in sorted(examples_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc:  # skip empty documents (a trailing `---`)
                manifests.append(Manifest(path, doc))
    return manifests


def _secret_values(doc: Mapping[str, Any]) -> Iterable[str]:
    yield from (str(v) for v in (doc.get("stringData") or {}).values())
    for raw in (doc.get("data") or {}).values():
        with contextlib.suppress(ValueError):
            yield base64.b64decode(str(raw)).decode(errors="replace")


def skip_reason(manifest: Manifest, served: Mapping[tuple[str, str], Any]) -> str | None:
    """Why a document of examples/ is not applied in the demo, or None to apply it."""
    if (manifest.api_version, manifest.kind) not in served:
        return f"{manifest.api_version} {manifest.kind} is not served (no CRD in crds/ for it yet)"
    if manifest.kind == "Secret" and any(
        _PLACEHOLDER.search(v) for v in _secret_values(manifest.doc)
    ):
        return "placeholder credential; the demo hands the operator its key directly"
    if manifest.kind in SERVER_KINDS:
        return "a ZenML server of its own (an example URL); the demo runs one ZenML server"
    if manifest.kind == "ServiceAccount" and "serverRef" in (manifest.doc.get("spec") or {}):
        return "on a ZenML server of its own (spec.serverRef); the demo runs one ZenML server"
    return None


# --------------------------------------------------------------------------- the emulated cluster


@dataclasses.dataclass
class DemoCluster:
    """The emulated API, a client for it (as kubectl would be) and the running operator."""

    url: str
    emulator: Any  # ClusterEmulator (imported lazily: kmock is a demo/test extra)
    http: httpx.AsyncClient
    operator: Any  # BackgroundOperator
    served: dict[tuple[str, str], Any]  # (apiVersion, kind) -> kmock.resource

    def path(self, manifest: Manifest, ns: str | None, name: str | None) -> str:
        """The URL path of the manifest's collection (name None) or of one object."""
        from zenml_devstack.kube_emulator import api_path

        resource = self.served[(manifest.api_version, manifest.kind)]
        namespaced = self.emulator.resources[resource].namespaced
        return api_path(resource, namespace=ns if namespaced else None, name=name)

    async def get(self, path: str) -> dict[str, Any] | None:
        response = await self.http.get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


def served_kinds(emulator: Any) -> dict[tuple[str, str], Any]:
    served = {}
    for resource, info in emulator.resources.items():
        api_version = f"{resource.group}/{resource.version}" if resource.group else resource.version
        served[(api_version, info.kind)] = resource
    return served


def new_emulator(crds: list[dict[str, Any]]) -> Any:
    """A `ClusterEmulator` that serves the built-in kinds and the given CRDs (not served yet)."""
    from zenml_devstack.kube_emulator import ClusterEmulator, declare_resources

    emulator = ClusterEmulator()
    declare_resources(emulator, crds=crds)
    return emulator


@contextlib.asynccontextmanager
async def demo_cluster(
    *,
    emulator: Any,
    zenml_url: str,
    operator_api_key: str,
    namespaces: Iterable[str],
    resync_seconds: float = 30.0,
    handle_signals: bool = False,
) -> AsyncIterator[DemoCluster]:
    """Serve `emulator` with the namespaces created; run the operator on it, watching them."""
    from zenml_devstack.kopf_runner import start_operator
    from zenml_devstack.kube_emulator import add_namespace, serve_emulator

    watched = sorted(set(namespaces))
    for namespace in watched:
        add_namespace(emulator, namespace)
    url, stop_emulator = await serve_emulator(emulator)
    try:
        # verify=False: plain HTTP on loopback; it only skips loading a CA bundle.
        async with httpx.AsyncClient(base_url=url, timeout=10.0, verify=False) as http:
            config = OperatorConfig(
                zenml_url=zenml_url,
                zenml_api_key=lambda: operator_api_key,
                kube_api_url=url,
                resync_seconds=resync_seconds,
                # A failed reconcile is retried after this delay; the production default (15 s)
                # would make a transient hiccup look like a hang in a one-minute demo.
                retry_delay=2.0,
            )
            operator = await start_operator(
                registry=build_registry(config),
                namespaces=watched,
                memo=kopf.Memo(),
                handle_signals=handle_signals,
            )
            try:
                yield DemoCluster(url, emulator, http, operator, served_kinds(emulator))
            finally:
                # Graceful: Kopf's cleanup handlers close the operator's HTTP clients.
                await operator.stop(graceful=True)
    finally:
        await stop_emulator()


# --------------------------------------------------------------------------- the steps


async def apply_examples(
    cluster: DemoCluster, manifests: list[Manifest], say: Say, report: DemoReport
) -> list[Manifest]:
    """POST each document as `kubectl create -f` would; return the applied ones."""
    applied = []
    width = max((len(f"{m.kind} {m.ref()}") for m in manifests), default=0)
    # Namespaces first, as kubectl does, so the objects in them can be created.
    for manifest in sorted(manifests, key=lambda m: m.kind != "Namespace"):
        where = f"{manifest.kind} {manifest.ref()}".ljust(width)
        source = f"examples/{manifest.path.name}"
        reason = skip_reason(manifest, cluster.served)
        if reason is not None:
            say(f"      skipped  {where}  {source}: {reason}")
            continue
        body = dict(manifest.doc)
        namespace = manifest.namespace or "default"
        response = await cluster.http.post(cluster.path(manifest, namespace, None), json=body)
        if manifest.kind == "Namespace" and response.status_code == 409:
            say(f"      exists   {where}  {source}")
            continue
        ok = response.is_success
        report.add(f"apply {where.rstrip()}", ok, "" if ok else response.text[:300])
        say(f"      {'applied' if ok else 'FAILED':<8} {where}  {source}")
        if ok:
            applied.append(manifest)
    return applied


def ready_condition(obj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The Ready condition written for the object's current generation, if any."""
    if not obj:
        return None
    generation = obj["metadata"].get("generation")
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("observedGeneration") == generation:
            return dict(cond)
    return None


async def wait_ready(
    cluster: DemoCluster, manifest: Manifest, *, timeout: float
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Poll until Ready=True for the current generation, or the deadline; (object, condition)."""
    path = cluster.path(manifest, manifest.namespace or "default", manifest.name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        obj = await cluster.get(path)
        cond = ready_condition(obj)
        if (cond and cond.get("status") == "True") or loop.time() >= deadline:
            return obj, cond
        await asyncio.sleep(0.1)


def _table(rows: list[list[str]], indent: str = "      ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


@dataclasses.dataclass
class _SecretSeen:
    ref: str  # ns/name
    account: str
    key_value: str = dataclasses.field(repr=False)
    data: dict[str, str] = dataclasses.field(repr=False, default_factory=dict)


async def _logs_in_as(url: str, key_value: str) -> str | None:
    client = zc.ZenMLClient(url, key_value, max_retries=0)
    try:
        return await client.current_user_name()
    except (zc.UnauthorizedError, zc.ForbiddenError):
        return None
    finally:
        await client.aclose()


async def check_service_account(
    cluster: DemoCluster,
    manifest: Manifest,
    obj: Mapping[str, Any],
    say: Say,
    report: DemoReport,
) -> list[_SecretSeen]:
    """Each Secret of the resource holds a key that logs in to ZenML as its account."""
    seen = []
    spec = ServiceAccountSpec.model_validate(manifest.doc.get("spec") or {})
    account = (obj.get("status") or {}).get("accountName") or spec.account_name_for(manifest.name)
    namespace = manifest.namespace or "default"
    for key in spec.api_keys:
        secret_name = key.secret_name_for(manifest.name)
        ref = f"{namespace}/{secret_name}"
        secret = await cluster.get(f"/api/v1/namespaces/{namespace}/secrets/{secret_name}")
        if secret is None or not sec.is_owned_by(secret, obj["metadata"]["uid"]):
            what = "missing" if secret is None else "not written by the operator"
            report.add(f"Secret {ref}", False, what)
            report.logins[ref] = None
            say(f"      Secret {ref}: {what}: FAILED")
            continue
        data = {k: sec.unb64(v) for k, v in (secret.get("data") or {}).items()}
        names = key.secret_template.keys
        url, value = data.get(names.url, ""), data.get(names.api_key, "")
        expect_login = spec.active and key.active
        user = await _logs_in_as(url, value) if url and value else None
        report.logins[ref] = user
        ok = bool(url and value) and (user == account if expect_login else user is None)
        if not (url and value):
            outcome = f"lacks {names.url} or {names.api_key}"
        else:
            outcome = f"logs in to ZenML as {user}" if user else "is refused by ZenML"
        report.add(f"Secret {ref} login", ok, outcome)
        say(f"      Secret {ref} {outcome}: {_ok(ok)}")
        say(f"        {names.url}={url}  {names.api_key}={mask(value)}")
        seen.append(_SecretSeen(ref, account, value, data))
    return seen


def _secret_refs(pod_spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(Secret name, how it is used) for every Secret a pod template reads."""
    refs = []
    for container in [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]:
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                refs.append((source["secretRef"]["name"], f"envFrom of {container['name']}"))
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], f"env {env['name']} of {container['name']}"))
    for volume in pod_spec.get("volumes") or []:
        if "secret" in volume:
            refs.append((volume["secret"]["secretName"], f"volume {volume['name']}"))
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "secret" in source:
                refs.append((source["secret"]["name"], f"volume {volume['name']}"))
    return refs


def check_workload(
    manifest: Manifest,
    written: Mapping[str, _SecretSeen],
    say: Say,
    report: DemoReport,
) -> None:
    """The Secrets a Deployment reads exist and were written by the operator (no pod runs)."""
    namespace = manifest.namespace or "default"
    pod_spec = ((manifest.doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    for secret_name, usage in _secret_refs(pod_spec):
        ref = f"{namespace}/{secret_name}"
        ok = ref in written
        report.add(f"{manifest.kind} {manifest.ref()} reads Secret {ref}", ok)
        what = "written by the operator" if ok else "NOT written by the operator"
        say(
            f"      {manifest.kind} {manifest.ref()} reads Secret {secret_name} ({usage}):"
            f" {what}: {_ok(ok)}"
        )


def pod_environment(
    manifest: Manifest, written: Mapping[str, _SecretSeen]
) -> tuple[str, dict[str, str], str] | None:
    """The environment the first container with `envFrom` of an operator Secret would get.

    Returns (container, env, expected ZenML user), built as the kubelet does: envFrom Secrets
    in order (with their prefix), then the container's literal `env` values.
    """
    namespace = manifest.namespace or "default"
    pod_spec = ((manifest.doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in pod_spec.get("containers") or []:
        env: dict[str, str] = {}
        account = None
        for source in container.get("envFrom") or []:
            seen = written.get(f"{namespace}/{(source.get('secretRef') or {}).get('name')}")
            if seen is not None:
                account = seen.account
                prefix = source.get("prefix", "")
                env.update({prefix + k: v for k, v in seen.data.items()})
        if account is None:
            continue
        env.update({e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e})
        return container["name"], env, account
    return None


async def run_real_client(
    python: str, pod_env: Mapping[str, str], *, timeout: float = 60.0
) -> tuple[int, str]:
    """Run `Client().active_user.name` with the real zenml package, as a pod would.

    Only the pod's environment plus what a shell needs: no ZENML_* of ours leaks in, and the
    client's global configuration goes to a throw-away directory, not the user's home.
    """
    with tempfile.TemporaryDirectory(prefix="zenml-client-") as config_dir:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": config_dir,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **pod_env,
            "ZENML_CONFIG_PATH": config_dir,
            "ZENML_ANALYTICS_OPT_IN": "false",
            "ZENML_LOGGING_COLORS_DISABLED": "true",
        }
        # Async subprocess: the emulator and the operator share this event loop.
        process = await asyncio.create_subprocess_exec(
            python,
            "-c",
            _REAL_CLIENT_SNIPPET,
            env=env,
            cwd=config_dir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            return -1, f"no answer in {timeout:.0f} s"
        finally:
            if process.returncode is None:  # timed out, or the demo was interrupted
                process.kill()
                await process.wait()
    return int(process.returncode or 0), mask_text(output.decode(errors="replace"))


async def delete_service_account(
    cluster: DemoCluster,
    manifest: Manifest,
    secrets_seen: list[_SecretSeen],
    admin: zc.ZenMLClient,
    say: Say,
    report: DemoReport,
    *,
    timeout: float,
) -> None:
    """Delete the resource; its finalizer applies spec.deletionPolicy and removes the Secrets."""
    spec = ServiceAccountSpec.model_validate(manifest.doc.get("spec") or {})
    namespace = manifest.namespace or "default"
    path = cluster.path(manifest, namespace, manifest.name)
    await cluster.http.delete(path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await cluster.get(path) is not None and loop.time() < deadline:
        await asyncio.sleep(0.1)
    gone = await cluster.get(path) is None
    remaining = [
        s.ref
        for s in secrets_seen
        if await cluster.get("/api/v1/namespaces/{}/secrets/{}".format(*s.ref.split("/", 1)))
    ]
    policy = spec.deletion_policy
    account_name = spec.account_name_for(manifest.name)
    try:
        account: zc.ServiceAccountInfo | None = await admin.get_service_account(account_name)
    except zc.NotFoundError:
        account = None
    expected_account = {
        "Delete": account is None or not account.active,  # Delete falls back to Deactivate
        "Deactivate": account is not None and not account.active,
        "Retain": account is not None and account.active,
    }[policy]
    logins = [await _logs_in_as(admin.url, s.key_value) for s in secrets_seen]
    keys_ok = all(u is None for u in logins) if policy != "Retain" else all(logins)
    ok = gone and not remaining and expected_account and keys_ok
    state = "deleted" if account is None else ("active" if account.active else "deactivated")
    keys = "its keys are refused now" if all(u is None for u in logins) else "its keys still log in"
    report.add(f"delete {manifest.kind} {manifest.ref()}", ok)
    say(
        f"      {manifest.kind} {manifest.ref()} deleted"
        f"{'' if gone else ' (NOT finalized in time)'}; Secrets"
        f" {'removed' if not remaining else 'LEFT: ' + ', '.join(remaining)}; ZenML account"
        f" {account_name!r} {state} (deletionPolicy {policy}); {keys}: {_ok(ok)}"
    )


async def run_examples(
    *,
    zenml_url: str,
    operator_api_key: str,
    root: Path,
    say: Say = print,
    zenml_python: str | None = None,
    hold: Callable[[DemoCluster], Awaitable[None]] | None = None,
    ready_timeout: float = 60.0,
) -> DemoReport:
    """Everything after the ZenML server: emulated API + operator, examples, checks, clean-up.

    `zenml_python`: run the real zenml client once with it (skipped when None).
    `hold`: when given, awaited after the checks instead of deleting the ServiceAccounts
    (the `--keep-running` mode); it returns when the user wants to stop.
    """
    report = DemoReport()
    crds = load_crds(root / "crds")
    manifests = load_examples(root / "examples")
    emulator = new_emulator(crds)
    served = served_kinds(emulator)
    # The namespaces of the documents to apply (created, and watched by the operator).
    namespaces = {"default"} | {
        m.namespace for m in manifests if m.namespace and skip_reason(m, served) is None
    }

    with _Timer(report, "operator start"):
        cluster_cm = demo_cluster(
            emulator=emulator,
            zenml_url=zenml_url,
            operator_api_key=operator_api_key,
            namespaces=namespaces,
            handle_signals=hold is not None,
        )
        cluster = await cluster_cm.__aenter__()
    try:
        crd_names = ", ".join(c["metadata"]["name"] for c in crds)
        say(f"      Kubernetes API (emulated): {cluster.url}")
        say(f"      CRDs from crds/: {crd_names}; namespaces: {', '.join(sorted(namespaces))}")
        say(
            "      operator running in this process, watching them"
            f" ({report.timings['operator start']:.1f} s)"
        )

        say("[4/6] Applying examples/*.yaml")
        applied = await apply_examples(cluster, manifests, say, report)
        ours = [m for m in applied if m.api_version.split("/")[0] == GROUP]

        say(f"[5/6] Waiting for Ready (deadline {ready_timeout:.0f} s), then checking every Secret")
        written: dict[str, _SecretSeen] = {}
        by_manifest: dict[int, list[_SecretSeen]] = {}
        with _Timer(report, "Ready"):
            results = await asyncio.gather(
                *(wait_ready(cluster, m, timeout=ready_timeout) for m in ours)
            )
        rows = [["RESOURCE", "READY", "ZENML ACCOUNT", "KEYS"]]
        for manifest, (obj, cond) in zip(ours, results, strict=True):
            ref = f"{manifest.kind} {manifest.ref()}"
            status = (obj or {}).get("status") or {}
            ready = (cond or {}).get("status", "Unknown"), (cond or {}).get("reason", "NoStatus")
            report.ready[manifest.ref()] = ready
            ok = ready[0] == "True"
            report.add(f"{ref} Ready", ok, (cond or {}).get("message", ""))
            keys = "-"
            if manifest.kind == "ServiceAccount":
                declared = (manifest.doc.get("spec") or {}).get("apiKeys") or []
                names = ", ".join(k["name"] for k in declared)
                keys = f"{status.get('readyKeys', 0)}/{len(declared)} ({names})"
            rows.append([ref, f"{ready[0]} ({ready[1]})", status.get("accountName", "-"), keys])
        say(
            f"      all Ready in {report.timings['Ready']:.1f} s"
            if report.ok
            else "      NOT all Ready:"
        )
        for line in _table(rows):
            say(line)
        for manifest, (_obj, cond) in zip(ours, results, strict=True):
            if cond and cond.get("status") != "True":
                say(f"      {manifest.ref()}: {cond.get('reason')}: {cond.get('message')}")

        with _Timer(report, "Secret logins"):
            for manifest, (obj, _cond) in zip(ours, results, strict=True):
                if manifest.kind == "ServiceAccount" and obj is not None:
                    seen = await check_service_account(cluster, manifest, obj, say, report)
                    by_manifest[id(manifest)] = seen
                    written.update({s.ref: s for s in seen})
        workloads = [m for m in applied if m.kind in ("Deployment", "StatefulSet", "DaemonSet")]
        for manifest in workloads:
            check_workload(manifest, written, say, report)

        if zenml_python is not None:
            with _Timer(report, "real zenml client"):
                await _check_real_client(zenml_python, workloads, written, say, report)

        errors = list(cluster.emulator.errors)
        if errors:
            report.add("emulator internal errors", False, f"{len(errors)} error(s)")
            say(f"      the emulated API recorded {len(errors)} internal error(s): FAILED")

        if hold is not None:
            await hold(cluster)
        else:
            say(
                "[6/6] Clean-up: deleting the ServiceAccounts"
                " (their finalizer applies deletionPolicy)"
            )
            with _Timer(report, "deletion"):
                async with zc.ZenMLClient(zenml_url, operator_api_key, max_retries=1) as admin:
                    for manifest in ours:
                        if manifest.kind == "ServiceAccount":
                            await delete_service_account(
                                cluster,
                                manifest,
                                by_manifest.get(id(manifest), []),
                                admin,
                                say,
                                report,
                                timeout=ready_timeout,
                            )
    finally:
        with _Timer(report, "operator stop"):
            await cluster_cm.__aexit__(None, None, None)
    return report


async def _check_real_client(
    python: str,
    workloads: list[Manifest],
    written: Mapping[str, _SecretSeen],
    say: Say,
    report: DemoReport,
) -> None:
    for manifest in workloads:
        found = pod_environment(manifest, written)
        if found is None:
            continue
        container, env, account = found
        start = time.monotonic()
        code, output = await run_real_client(python, env)
        elapsed = time.monotonic() - start
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        user = lines[-1] if code == 0 and lines else None
        report.real_client_user = user
        ok = user == account
        report.add(
            f"real zenml client with the env of {manifest.kind} {manifest.ref()}", ok, output[-500:]
        )
        say(
            f"      Real zenml client ({Path(python).parent.parent.name}) with the environment of"
            f" {manifest.kind} {manifest.ref()} container {container!r}:"
        )
        say(f"        $ python -c {_REAL_CLIENT_SNIPPET!r}")
        say(f"        -> {user!r}: {_ok(ok)} ({elapsed:.1f} s)")
        if not ok:
            for line in lines[-15:]:
                say(f"        | {line}")
        return
    report.add("real zenml client", False, "no Deployment uses envFrom of an operator Secret")
    say(
        "      Real zenml client: no Deployment in examples/ uses envFrom of an operator"
        " Secret: FAILED"
    )


# --------------------------------------------------------------------------- the whole demo


def _fresh_data_dir(path: Path) -> None:
    """Wipe the ZenML data dir of a previous run and recreate it.

    Fresh data every run (about 4 s more than reusing it): the example account names would
    otherwise already exist in ZenML, owned by a resource of a previous emulated cluster,
    and the operator rightly reports a NameConflict for those. Only a directory that this
    demo created (it holds the marker file) or an empty one is ever removed.
    """
    if path.exists():
        if not (path / _DATA_DIR_MARKER).exists() and any(path.iterdir()):
            raise RuntimeError(
                f"{path} exists and was not created by the demo; refusing to wipe it."
                " Pass another --workdir."
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / _DATA_DIR_MARKER).write_text("ZenML data of `make demo`; wiped on every run.\n")


def _quiet_logs(verbose: bool) -> Callable[[], None]:
    """Kopf, httpx and aiohttp log every request at INFO: keep them to warnings unless -v."""
    level = logging.INFO if verbose else logging.WARNING
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)

    def restore() -> None:
        for name, previous in saved.items():
            logging.getLogger(name).setLevel(previous)

    return restore


async def _start_server(start: Callable[..., Any], data_dir: Path, python: str) -> Any:
    """Start ZenML off the event loop (a subprocess and a blocking readiness poll).

    A thread cannot be interrupted: on Ctrl+C during the start, wait for it to finish and stop
    the server it started, or it would outlive the demo.
    """
    starting = asyncio.ensure_future(asyncio.to_thread(start, data_dir, python=python))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            (await starting).stop()
        raise


def _sigterm_like_ctrl_c() -> Callable[[], None]:
    """Make SIGTERM (`kill`, `timeout`, CI) clean up like Ctrl+C instead of killing Python.

    Python dies on SIGTERM without running `finally`, which would orphan the ZenML server.
    asyncio.run's own SIGINT handler cancels the main task; SIGTERM is routed to it.
    (The Kopf runner saves and restores Python-level handlers, so this one survives it.)
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _hold_until_interrupted(
    zenml_url: str, data_dir: Path, say: Say
) -> Callable[[DemoCluster], Awaitable[None]]:
    async def hold(cluster: DemoCluster) -> None:
        sa_path = "/apis/zenml.io/v1alpha1/namespaces/default/serviceaccounts"
        say("")
        say("Everything keeps running (--keep-running). Press Ctrl+C to stop.")
        say(f"  Kubernetes API (EMULATED): {cluster.url}")
        say(f"  ZenML server (REAL):       {zenml_url}")
        say(f"    dashboard login: user `default`, password in {data_dir / 'admin_password'}")
        say("  Inspect (plain HTTP, no auth):")
        say(f"    curl -s {cluster.url}{sa_path}/ml-pipelines | python3 -m json.tool")
        say(f"    curl -s {cluster.url}/api/v1/namespaces/default/secrets  # values are base64")
        say(
            f"    curl -s {cluster.url}/api/v1/namespaces/default/events"
            " | python3 -m json.tool | grep '\"message\"'"
        )
        say("  Change something and watch the operator follow:")
        say(
            f"    curl -s -X PATCH -H 'Content-Type: application/merge-patch+json'"
            f' -d \'{{"spec": {{"active": false}}}}\' {cluster.url}{sa_path}/ml-pipelines'
        )
        await cluster.operator.wait()  # returns on Ctrl+C / SIGTERM (handle_signals)
        say("Stopping.")

    return hold


async def run_demo(*, keep_running: bool, workdir: Path, verbose: bool = False) -> int:
    """The demo; returns the exit code (0 only if every check passed)."""
    from zenml_devstack.zenml_server import (
        create_service_account_with_key,
        find_zenml_python,
        start_zenml_server,
    )

    say: Say = lambda text: print(text, flush=True)  # noqa: E731
    restore_logs = _quiet_logs(verbose)
    restore_sigterm = _sigterm_like_ctrl_c()
    started = time.monotonic()
    server = None
    try:
        root = find_repo_root()
        zenml_python = find_zenml_python()
        say("zenml-operator demo")
        say(REAL_AND_EMULATED)
        data_dir = (Path(workdir) / "zenml").resolve()
        say(f"[1/6] Starting the ZenML server (fresh data in {data_dir}) ...")
        step = time.monotonic()
        _fresh_data_dir(data_dir)
        server = await _start_server(start_zenml_server, data_dir, zenml_python)
        server_start = time.monotonic() - step
        say(f"      ready at {server.url} ({server_start:.1f} s)")

        say(f"[2/6] The operator's own credential: service account {OPERATOR_ACCOUNT!r} + API key")
        step = time.monotonic()
        key = await asyncio.to_thread(
            create_service_account_with_key, server.url, server.admin_password, OPERATOR_ACCOUNT
        )
        server.grant_admin(OPERATOR_ACCOUNT)
        bootstrap = time.monotonic() - step
        say(f"      API key {mask(key)} issued ({bootstrap:.1f} s)")
        say(f"      {GRANT_ADMIN_WHY}")

        say("[3/6] Starting the emulated Kubernetes API and the operator")
        hold = _hold_until_interrupted(server.url, data_dir, say) if keep_running else None
        report = await run_examples(
            zenml_url=server.url,
            operator_api_key=key,
            root=root,
            say=say,
            zenml_python=zenml_python,
            hold=hold,
        )
    except (RuntimeError, TimeoutError) as exc:
        say(f"zenml-operator demo failed: {mask_text(str(exc))}")
        return 1
    except asyncio.CancelledError:
        # Ctrl+C outside --keep-running: asyncio.run cancels this task; the `finally` below
        # stops the ZenML server, and the user gets a line instead of a traceback.
        say("Interrupted; stopped everything.")
        return 130
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        restore_logs()
        restore_sigterm()
    total = time.monotonic() - started

    timings = {
        "ZenML server start": server_start,
        "operator credential": bootstrap,
        **report.timings,
    }
    say("Timings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    failed = [c for c in report.checks if not c.ok]
    if failed:
        say(f"{len(failed)} of {len(report.checks)} checks FAILED ({total:.0f} s):")
        for check in failed:
            say(f"  - {check.what}{': ' + mask_text(check.detail) if check.detail else ''}")
    else:
        say(f"All {len(report.checks)} checks passed in {total:.0f} s.")
    say(
        "Reminder: the ZenML server was REAL; the Kubernetes API was EMULATED"
        " (no cluster, no pods)."
    )
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="make demo",
        description="A real ZenML server + an EMULATED Kubernetes API, the operator in-process."
        ' Options go in DEMO_ARGS: make demo DEMO_ARGS="--keep-running -v".',
    )
    p.add_argument(
        "--keep-running", action="store_true", help="keep the operator running after the checks"
    )
    p.add_argument(
        "--workdir", default=".zenml-demo", help="where the demo ZenML server keeps its data"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show the operator's and Kopf's logs"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(
        run_demo(keep_running=args.keep_running, workdir=Path(args.workdir), verbose=args.verbose)
    )


if __name__ == "__main__":
    sys.exit(main())
