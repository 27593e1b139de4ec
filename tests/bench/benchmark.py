"""Benchmark: the operator against plain scripts, on a real ZenML server and a real cluster.

    .venv/bin/python tests/bench/benchmark.py            # N=200: ~10-12 min on 2 cores
    .venv/bin/python tests/bench/benchmark.py --large    # N=1000 (memory target): ~50 min
    .venv/bin/python tests/bench/benchmark.py --n 100 --runs 10 --cli-runs 5   # ~5 min
    .venv/bin/python tests/bench/benchmark.py --help     # knobs (concurrency, timeouts, profile)

Not a test (no `test_` prefix: pytest never collects it). It starts a local ZenML server
(`zenml_devstack.zenml_server`, from `.venv-zenml`) and a Kubernetes API, and runs the operator
in a SEPARATE process (this file with `--_runner`, via the devstack Kopf runner) so that its CPU
time and peak RSS are the operator's own.

The Kubernetes API (`--kube`, default auto): a REAL etcd + kube-apiserver on loopback, started
by `tests/control_plane.py` from the binaries in KUBEBUILDER_ASSETS when they are there
(`--kube real` insists); else the emulator (`zenml_devstack.kube_emulator`) served from THIS
process (`--kube emulated`), whose CPU grows with the number of objects it holds. With the real
one, the operator logs in with a kubeconfig (a token of its own ServiceAccount, bound to
cluster-admin), the benchmark observes through the API (a watch per kind per phase, LISTs,
a few GETs), the operator's Kubernetes requests are counted from the apiserver's audit log, and
the CPU of kube-apiserver and etcd is reported per phase.

Each figure is measured side by side in the same run:

1. latency: one ServiceAccount with one key, from the POST to the Kubernetes API until the key
   in its Secret logs in to ZenML, against a script with a WARM logged-in client (as the
   operator's is) doing create account + create key + the same login with the key;
2. throughput: N ServiceAccounts applied at once until all are Ready, against a plain async
   loop of the same ZenML calls with the same concurrency limit, and against the
   `zenml service-account create` CLI (timed runs, extrapolated to N);
3. idle cost: a fresh operator with a short resync interval over the N converged objects:
   Kubernetes writes and ZenML requests per object per interval;
4. memory: the operator process's peak RSS (VmHWM) over the whole run at N;
5. rotation fan-out: N ApiKeyRotations asked to rotate at once (on-demand annotation) until
   every Secret holds its new key, against a plain loop of N ZenML key creates;
6. restart: a fresh operator process over the converged objects: ZenML requests per object
   and their peak rate per second (the background lane's pacing), and a ServiceAccount created
   during the wave, against a loop reading each account's key list once;
8. servers (issue 13): a second real ZenML server B behind a ZenMLServer; M ServiceAccounts
   on the default server created at once until all are Ready, beside M on B while B is
   healthy, and while B hangs (SIGSTOP); then B's converge after the resume.

Nothing here prints a key value. The output ends with the table in Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import contextvars
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

# Only the standard library at module level: the operator process (`--_runner`) must not carry
# the emulator's or the benchmark's imports in its RSS.

NS = "bench"
SA_RES = "zenml.io/v1alpha1/serviceaccounts"
ROT_RES = "zenml.io/v1alpha1/apikeyrotations"
SECRET_RES = "v1/secrets"
SA_PATH = f"/apis/zenml.io/v1alpha1/namespaces/{NS}/serviceaccounts"
ROT_PATH = f"/apis/zenml.io/v1alpha1/namespaces/{NS}/apikeyrotations"
SECRET_PATH = f"/api/v1/namespaces/{NS}/secrets"
EVENTS_PATH = f"/api/v1/namespaces/{NS}/events"
ZS_RES = "zenml.io/v1alpha1/zenmlservers"
ZS_PATH = f"/apis/zenml.io/v1alpha1/namespaces/{NS}/zenmlservers"
RES_PATHS = {
    SA_RES: SA_PATH,
    ROT_RES: ROT_PATH,
    SECRET_RES: SECRET_PATH,
    "v1/events": EVENTS_PATH,
    ZS_RES: ZS_PATH,
}
ROOT = Path(__file__).resolve().parents[2]
ANN_KEY_ID = "zenml.io/api-key-id"
ROTATE_ANNOTATION = "zenml.io/rotate"
OPERATOR_ACCOUNT = "zenml-operator"
MB = 1024 * 1024
# The create/rotate phases' operator resyncs this rarely, so that no first resync (0.5-1.0 x
# the interval after a create) falls into a measured phase and is billed to creates or
# rotations; what a resync costs is phase 3's own figure.
MAIN_RESYNC = 3600.0


# ================================================================== the operator process


_KIND: contextvars.ContextVar[str] = contextvars.ContextVar("bench_kind", default="other")
_ZENML_ATTEMPTS = "attempts zenml"  # a key of the counts, reported as `zenml_requests`
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _route(path: str) -> str:
    """A ZenML path with its ids and names replaced, e.g. service_accounts/{sa}/api_keys."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    out = []
    for i, part in enumerate(parts):
        prev = parts[i - 1] if i else ""
        if prev == "service_accounts":
            out.append("{sa}")
        elif prev == "api_keys":
            out.append("{key}")
        else:
            out.append(_UUID.sub("{id}", part))
    return "/".join(p for p in out if p not in ("api", "v1"))


def _instrument(
    counts: collections.Counter[str], per_second: dict[str, collections.Counter[int]]
) -> None:
    """Count ZenML requests by reconciler and route, and reconciles, in the operator process;
    and ZenML requests per wall-clock second (all, and those of the background lane).

    Monkeypatching in the benchmark's own process only: the operator's code is unchanged.
    """
    from zenml_operator.handlers import rotation as rot
    from zenml_operator.handlers import service_account as sa
    from zenml_operator.zenml_api import ZenMLClient
    from zenml_operator.zenml_api.connection import ZenMLConnection

    try:
        from zenml_operator.zenml_api.pacing import in_background
    except ImportError:  # an operator from before the background lane

        def in_background() -> bool:
            return False

    send = ZenMLConnection._send

    async def counted_send(self: Any, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        counts[f"zenml {_KIND.get()} {method} {_route(path)}"] += 1
        return await send(self, method, path, *args, **kwargs)

    ZenMLConnection._send = counted_send  # type: ignore[method-assign]

    # Every HTTP attempt (retries included), through the client's own observer hook.
    init = ZenMLClient.__init__

    def observed_init(self: Any, *args: Any, observer: Any = None, **kwargs: Any) -> None:
        def observe(method: str, route: str, status: int | None, seconds: float) -> None:
            counts[_ZENML_ATTEMPTS] += 1
            sent = int(time.time() - seconds)  # when it was sent (the second it started)
            per_second["all"][sent] += 1
            if in_background():
                per_second["background"][sent] += 1
            if observer is not None:
                observer(method, route, status, seconds)

        init(self, *args, observer=observe, **kwargs)

    ZenMLClient.__init__ = observed_init  # type: ignore[method-assign]

    def wrap(cls: Any, kind: str) -> None:
        run = cls.run

        async def counted_run(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[f"reconcile {kind}"] += 1
            token = _KIND.set(kind)
            try:
                return await run(self, *args, **kwargs)
            finally:
                _KIND.reset(token)

        cls.run = counted_run

    wrap(sa.ServiceAccountReconciler, "serviceaccount")
    wrap(rot.RotationReconciler, "rotation")


async def login_with_api_key(url: str, api_key: str) -> str:
    """tests/zenml_login.py's check that a key works (tests/ is not a package)."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from zenml_login import login_with_api_key as login

    return await login(url, api_key)


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM in bytes, from /proc."""
    result = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                result[key] = int(value.split()[0]) * 1024
    return result


def _cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runner_main() -> int:
    """`benchmark.py --_runner`: run the operator; JSON lines on stdout, commands on stdin."""
    import logging

    import kopf

    cfg = json.loads(os.environ.pop("BENCH_RUNNER_CONFIG"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kopf.configure(verbose=False)  # as `zenml-operator run` does: INFO logs, to stderr (a file)
    counts: collections.Counter[str] = collections.Counter()
    per_second: dict[str, collections.Counter[int]] = {
        "all": collections.Counter(),
        "background": collections.Counter(),
    }
    _instrument(counts, per_second)
    asyncio.run(_runner(cfg, counts, per_second))
    return 0


async def _runner(
    cfg: dict[str, Any],
    counts: collections.Counter[str],
    per_second: dict[str, collections.Counter[int]],
) -> None:
    import kopf

    from zenml_devstack.kopf_runner import start_operator
    from zenml_operator.config import OperatorConfig
    from zenml_operator.main import build_registry

    key = cfg.pop("api_key")
    known = {f.name for f in dataclasses.fields(OperatorConfig)}
    options = {k: v for k, v in cfg["config"].items() if k in known and v is not None}
    config = OperatorConfig(zenml_api_key=lambda: key, namespaces=(NS,), **options)
    kopf_settings = cfg["kopf"]

    def settings_hook(settings: kopf.OperatorSettings) -> None:
        # The knobs that matter at scale (see the README of this folder).
        if kopf_settings.get("worker_limit") is not None:
            settings.queueing.worker_limit = kopf_settings["worker_limit"]
        if kopf_settings.get("posting_worker_limit") is not None:
            settings.posting.worker_limit = kopf_settings["posting_worker_limit"]

    memo = kopf.Memo()
    operator = await start_operator(
        registry=build_registry(config),
        namespaces=[NS],
        settings_hook=settings_hook,
        memo=memo,
        ready_timeout=120,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def snapshot() -> dict[str, Any]:
        kube = getattr(memo, "kube", None)
        counted = dict(counts)
        return {
            "event": "stats",
            "zenml_requests": counted.pop(_ZENML_ATTEMPTS, 0),
            "kube_writes": getattr(kube, "writes", 0),
            "counts": counted,
            "per_second": {lane: dict(bins) for lane, bins in per_second.items()},
            "cpu": _cpu_seconds(),
            **_proc_status(),
        }

    def emit(payload: Mapping[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    def commands() -> None:  # a thread: stdin is blocking
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                emit(asyncio.run_coroutine_threadsafe(snapshot(), loop).result())
            elif command == "stop":
                break
        loop.call_soon_threadsafe(stop.set)

    emit({"event": "ready", "pid": os.getpid(), **_proc_status()})
    threading.Thread(target=commands, daemon=True).start()
    await stop.wait()
    trace_path = os.environ.get("BENCH_TRACEMALLOC")
    if trace_path:  # where the live Python memory is, by line (see --tracemalloc)
        import tracemalloc

        top = tracemalloc.take_snapshot().statistics("lineno")[:40]
        Path(trace_path).write_text("\n".join(str(stat) for stat in top) + "\n")
    await operator.stop(graceful=True, timeout=30)
    emit({"event": "stopped", **_proc_status()})


# ================================================================== the benchmark side


@dataclasses.dataclass
class Stats:
    """A snapshot of the operator process (see `_runner.snapshot`)."""

    zenml_requests: int = 0
    kube_writes: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    cpu: float = 0.0
    rss: int = 0
    hwm: int = 0
    # ZenML requests per wall-clock second (time.time()), "all" and "background".
    per_second: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Stats:
        return cls(
            zenml_requests=data.get("zenml_requests", 0),
            kube_writes=data.get("kube_writes", 0),
            counts=dict(data.get("counts") or {}),
            per_second={
                lane: {int(k): int(v) for k, v in bins.items()}
                for lane, bins in (data.get("per_second") or {}).items()
            },
            cpu=data.get("cpu", 0.0),
            rss=data.get("VmRSS", 0),
            hwm=data.get("VmHWM", 0),
        )

    def minus(self, before: Stats) -> Stats:
        keys = set(self.counts) | set(before.counts)
        return Stats(
            zenml_requests=self.zenml_requests - before.zenml_requests,
            kube_writes=self.kube_writes - before.kube_writes,
            counts={
                k: self.counts.get(k, 0) - before.counts.get(k, 0)
                for k in keys
                if self.counts.get(k, 0) != before.counts.get(k, 0)
            },
            cpu=self.cpu - before.cpu,
            rss=self.rss,
            hwm=self.hwm,
            per_second=self.per_second,
        )


class OperatorProcess:
    """The operator in its own process (this file with --_runner), optionally under py-spy."""

    def __init__(
        self,
        label: str,
        cfg: dict[str, Any],
        workdir: Path,
        profile: bool,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.label = label
        self.cfg = cfg
        self.extra_env = dict(env or {})
        self.workdir = workdir
        self.profile = profile
        self.tracemalloc = False
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.hwm = 0
        self.start_rss = 0
        self.log_path = workdir / f"operator-{label}.log"
        self.profile_path = workdir / f"operator-{label}.pyspy.txt"

    async def start(self) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--_runner"]
        if self.profile:
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            command = [
                pyspy, "record", "--format", "raw", "--rate", "97", "--nonblocking",
                "-o", str(self.profile_path), "--", *command,
            ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        env.update(self.extra_env)  # the real cluster's kubeconfig, if any
        env["BENCH_RUNNER_CONFIG"] = json.dumps(self.cfg)  # holds the key: env, not argv
        if self.tracemalloc:
            env["PYTHONTRACEMALLOC"] = "1"
            env["BENCH_TRACEMALLOC"] = str(self.workdir / f"operator-{self.label}.tracemalloc.txt")
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
            )
        ready = await self._read("ready", timeout=180)
        self.pid = int(ready["pid"])
        self.start_rss = int(ready.get("VmRSS", 0))

    async def _read(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"operator {self.label}: no {event!r} in {timeout:.0f} s")
            line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            if not line:
                raise RuntimeError(
                    f"operator {self.label} exited (code {await self.proc.wait()}); "
                    f"see {self.log_path}"
                )
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict) and data.get("event") == event:
                    return data

    async def stats(self) -> Stats:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        stats = Stats.parse(await self._read("stats", timeout=60))
        self.hwm = max(self.hwm, stats.hwm)
        return stats

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            self.hwm = max(self.hwm, (await self.stats()).hwm)
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.write(b"stop\n")
            await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ready_condition(obj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    # Imported here: the operator process runs this file too and must not load the demo.
    from zenml_devstack.demo import ready_condition as demo_ready_condition

    return demo_ready_condition(obj)


def is_ready(obj: Mapping[str, Any] | None) -> bool:
    cond = ready_condition(obj)
    return bool(cond and cond.get("status") == "True")


def sa_body(name: str, server: str | None = None) -> dict[str, Any]:
    """A ServiceAccount with one key `k`; `server`: the ZenMLServer it uses (else the
    default server)."""
    spec: dict[str, Any] = {"apiKeys": [{"name": "k"}]}
    if server is not None:
        spec["serverRef"] = {"kind": "ZenMLServer", "name": server}
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def server_logged_in(obj: Mapping[str, Any] | None) -> bool:
    """A ZenMLServer Ready=True (LoggedIn) for its current generation."""
    if not obj:
        return False
    status = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    for cond in status.get("conditions") or []:
        if cond.get("type") != "Ready":
            continue
        observed = cond.get("observedGeneration", status.get("observedGeneration"))
        return bool(observed == generation and cond.get("status") == "True")
    return False


def rotation_body(name: str, sa_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "zenml.io/v1alpha1",
        "kind": "ApiKeyRotation",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "serviceAccountName": sa_name,
            "apiKeyName": "k",
            "period": "720h",
            "retainPeriodMinutes": 60,
        },
    }


def secret_key(secret: Mapping[str, Any] | None) -> str | None:
    data = (secret or {}).get("data") or {}
    raw = data.get("ZENML_STORE_API_KEY")
    return base64.b64decode(raw).decode() if raw else None


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    versions = {}
    from importlib import metadata

    for dist in ("kopf", "httpx", "kmock"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": cpu,
        "cores": str(cores),
        "RAM": mem,
        "Python": platform.python_version(),
        "OS": f"{platform.system()} {platform.release()}",
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()) + ", zenml 0.98.0 (server)",
    }


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def bench_emulator() -> Any:
    """A `ClusterEmulator` whose request log stays short, and that counts requests instead.

    kmock keeps every request it served and, to route each new one, scans that whole log once
    per reaction it tries (``request in payload._source``): every request costs O(requests so
    far, ~10 µs per reaction and logged request). Over a benchmark (tens of thousands of
    requests) the emulator, not the operator, became the bottleneck (45 ms per GET with only
    500 requests logged, 150+ ms later). This subclass keeps only the request being routed in
    the log, and per-kind counts for the report.
    """
    from zenml_devstack.kube_emulator import ClusterEmulator

    class BenchEmulator(ClusterEmulator):  # type: ignore[misc,valid-type]
        async def _handle(self, request: Any) -> Any:
            counts = self.__dict__.setdefault("bench_counts", collections.Counter())
            plural = getattr(request.resource, "plural", None) or "?"
            sub = f"/{request.subresource}" if getattr(request, "subresource", None) else ""
            method = str(getattr(request.method, "value", request.method))
            action = str(getattr(request.action, "value", None) or method)
            counts[f"{action} {plural}{sub}"] += 1
            counts["write" if method not in ("GET", "HEAD") else "read"] += 1
            # Routing runs synchronously up to the first real I/O wait, so the request being
            # routed only needs to be in the log now: keep it alone (and bound the per-reaction
            # logs, which only cost memory).
            for log in (self._requests, *(getattr(p, "_requests", []) for p in self._payloads)):
                if len(log) > 1:
                    del log[:-1]
            return await super()._handle(request)

    return BenchEmulator()


def kube_counts(emulator: Any) -> collections.Counter[str]:
    return collections.Counter(emulator.__dict__.get("bench_counts") or {})


# Why the watches here are shaped as they are (kube-apiserver 1.36 with Debian's etcd 3.4.23).
# The apiserver serves watches from its watch cache. A watch WITHOUT a resourceVersion asks for
# a consistent start: the cache must first reach etcd's current revision, and on a resource
# with no recent writes it only gets there through etcd's progress notifications, which etcd
# 3.4 does not support ("RequestWatchProgress feature is not supported" in the apiserver's
# log). Every such attempt then ends after 3 s with an ERROR event (504 "Too large resource
# version"), again and again while the resource stays idle: a wait for a ServiceAccount the
# operator had made Ready in a second hung for 120 s that way. A watch FROM an explicit
# resourceVersion (a LIST's or an event's) is served at once and waits for newer events. So:
# - every watch starts from an explicit resourceVersion, and after an ERROR or a closed stream
#   is re-opened from the last resourceVersion it saw (events come in resourceVersion order,
#   so none is lost);
# - a wait that does not time anything (`RealKube.wait_for`) checks the object with a LIST
#   first, watches from that LIST's resourceVersion with a short deadline per attempt, and
#   checks again after every ERROR, closed stream or deadline: it never depends on the watch;
# - a watch that times what is measured stays a watch (a poll would add its interval), with
#   the same LIST check after an ERROR as the fallback (`recover`).
WATCH_ATTEMPT_SECONDS = 5.0
WATCH_RETRY_CAP_SECONDS = 2.0

Recover = Callable[[int | None, int | None], Awaitable[tuple[bool, int | None]]]


async def follow_watch(
    http: Any,
    path: str,
    since: int | None,
    on_event: Callable[[dict[str, Any]], bool],
    params: Mapping[str, str] | None = None,
    *,
    recover: Recover | None = None,
    attempt_timeout: float | None = None,
) -> None:
    """Follow a watch from resourceVersion `since` until `on_event` returns True (see above).

    Re-opened from the last resourceVersion seen whenever the server ends it (a real
    apiserver ends watches after its request timeout) or sends an ERROR event. `recover(last,
    code)` is awaited first when given, after an ERROR (`code`: its HTTP code, e.g. 504 or 410)
    and, with `attempt_timeout`, after a closed or silent attempt (`code` None): the caller's
    check of the state by a LIST; it returns (done, resourceVersion to resume from, or None
    for the last seen). Without `recover`, a 410 Gone (the point compacted away) is fatal:
    events would be lost. Bounded only by the caller's timeout."""
    last = since
    while True:
        query = {"watch": "true", **(params or {})}
        if last is not None:
            query["resourceVersion"] = str(last)
        code: int | None = None
        delay = 0.0
        try:
            async with contextlib.AsyncExitStack() as stack:
                if attempt_timeout is not None:
                    await stack.enter_async_context(asyncio.timeout(attempt_timeout))
                response = await stack.enter_async_context(
                    http.stream("GET", path, params=query, timeout=None)
                )
                if response.status_code == 429 or response.status_code >= 500:
                    # A real apiserver answers 429 while the watch cache of a new CRD
                    # initialises.
                    code = response.status_code
                    delay = float(response.headers.get("Retry-After") or 1)
                else:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            code = int(obj.get("code") or 500)
                            details = obj.get("details") or {}
                            delay = float(details.get("retryAfterSeconds") or 1)
                            break
                        rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if rv:
                            last = int(rv)
                        if event.get("type") != "BOOKMARK" and on_event(event):
                            return
        except TimeoutError:
            if attempt_timeout is None:
                raise
            # This attempt's own deadline (the caller's would have cancelled us instead).
        if recover is not None and (code is not None or attempt_timeout is not None):
            done, resume = await recover(last, code)
            if done:
                return
            if resume is not None:
                last = resume
                delay = 0.0
        elif code == 410:
            raise RuntimeError(f"watch {path}: 410 Gone from resourceVersion {last}")
        if delay:
            await asyncio.sleep(min(delay, WATCH_RETRY_CAP_SECONDS))


def _kube_key(verb: str, resource: str, subresource: str | None) -> str:
    return f"{verb} {resource}" + (f"/{subresource}" if subresource else "")


class EmulatedKube:
    """The in-process emulator (`zenml_devstack.kube_emulator`), read directly from this process.

    The no-assets fallback. Its CPU is this process's (with the benchmark's own): kmock's
    cost per request grows with the number of objects it holds.
    """

    mode = "emulated"

    def __init__(self, n: int) -> None:
        self.n = n
        self.description = (
            "emulated Kubernetes API (zenml_devstack.kube_emulator, in the benchmark process)"
        )
        self.counted_as = "requests the emulator served (all clients)"
        self.changes_label = "resourceVersion delta"
        self.recording_errors: list[str] = []
        self.watch_notes: list[str] = []

    async def start(self, workdir: Path) -> None:
        import httpx

        from zenml_devstack.kube_emulator import (
            add_namespace,
            declare_resources,
            serve_emulator,
        )

        emulator = bench_emulator()
        emulator.history_limit = max(emulator.history_limit, 40 * self.n + 10_000)
        declare_resources(emulator)
        add_namespace(emulator, NS)
        self.emulator = emulator
        self.url, self._stop = await serve_emulator(emulator)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=60.0, verify=False)

    async def stop(self) -> None:
        if getattr(self, "http", None) is not None:
            await self.http.aclose()
        if getattr(self, "_stop", None) is not None:
            await self._stop()

    def operator_config(self) -> dict[str, Any]:
        return {"kube_api_url": self.url}

    def operator_env(self) -> dict[str, str]:
        return {}

    async def resource_version(self) -> int:
        return int(self.emulator.resource_version)

    async def get(self, res: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.emulator.get_object(res, NS, name)
        return result

    async def list(self, res: str) -> list[dict[str, Any]]:
        return list(self.emulator.list_objects(res, namespace=NS))

    async def list_at(self, res: str) -> tuple[list[dict[str, Any]], int]:
        """The objects and the resourceVersion they are current at (a watch resumes there)."""
        return await self.list(res), int(self.emulator.resource_version)

    async def create_all(self, res: str, bodies: list[dict[str, Any]]) -> None:
        # One synchronous step (one event-loop turn): all N exist before the operator runs.
        for body in bodies:
            self.emulator.create_object(res, body, namespace=NS)

    async def request_mark(self) -> collections.Counter[str]:
        return kube_counts(self.emulator)

    async def requests_since(self, mark: collections.Counter[str]) -> collections.Counter[str]:
        counter = kube_counts(self.emulator)
        counter.subtract(mark)
        return counter

    def cpu(self) -> dict[str, float]:
        return {"emulator+benchmark": _cpu_seconds()}

    async def wait_secret_key(self, name: str, since: int, timeout: float) -> str:
        """A tight poll of the emulator's state (no request: the emulator is in-process)."""
        deadline = time.perf_counter() + timeout
        while True:
            value = secret_key(self.emulator.get_object(SECRET_RES, NS, name))
            if value is not None:
                return value
            if time.perf_counter() > deadline:
                raise TimeoutError(f"no Secret {name} in {timeout:.0f} s")
            await asyncio.sleep(0.001)

    async def wait_for(
        self, res: str, name: str, check: Callable[[dict[str, Any] | None], bool], timeout: float
    ) -> None:
        deadline = time.perf_counter() + timeout
        while not check(self.emulator.get_object(res, NS, name)):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{name} not as expected in {timeout} s")
            await asyncio.sleep(0.01)

    async def start_recording(self, since: int) -> None:
        self._recording_since = since

    async def stop_recording(self, until: int) -> list[tuple[str, dict[str, Any]]]:
        """The changes committed in (since, until]: (plural, watch event)."""
        since = self._recording_since
        return [
            (getattr(c.resource, "plural", "?"), c.event)
            for c in list(getattr(self.emulator, "_history", ()))
            if since < c.rv <= until
        ]


class RealKube:
    """etcd + kube-apiserver (+ kube-controller-manager with --controller-manager) on loopback.

    Started from KUBEBUILDER_ASSETS by `tests/control_plane.py`. The operator connects with a
    kubeconfig holding a token of its own ServiceAccount (bound to cluster-admin), so that the
    apiserver's audit log tells its requests from the benchmark's (the admin certificate).
    The benchmark observes through the API only: a watch per resource kind per phase, LISTs
    for the before/after states, single GETs for the few sampled Secrets.
    """

    mode = "real"
    OPERATOR_NS = "bench-system"

    def __init__(self, assets: Path, controller_manager: bool) -> None:
        self.assets = assets
        self.controller_manager = controller_manager
        self.user = f"system:serviceaccount:{self.OPERATOR_NS}:{OPERATOR_ACCOUNT}"
        self.counted_as = "the operator's requests in the apiserver's audit log"
        self.changes_label = f"changes watched in namespace {NS}"
        self._audit_offset = 0
        self._audit_counts: collections.Counter[str] = collections.Counter()
        self._recorders: list[asyncio.Task[None]] = []
        self._recorded: list[tuple[int, str, dict[str, Any]]] = []
        self.recording_errors: list[str] = []
        self.watch_notes: list[str] = []  # the watch fallbacks that were needed (the report)

    def _versions(self) -> str:
        def version(binary: str, flag: str) -> str:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [str(self.assets / binary), flag], capture_output=True, text=True, timeout=30
                ).stdout
                match = re.search(r"v?(\d+\.\d+\.\d+)", out)
                if match:
                    return match.group(1)
            return "?"

        return (
            f"real kube-apiserver {version('kube-apiserver', '--version')} + etcd "
            f"{version('etcd', '--version')}"
            + (" + kube-controller-manager" if self.controller_manager else "")
            + " on loopback (same machine)"
        )

    async def start(self, workdir: Path) -> None:
        import httpx
        import yaml

        from control_plane import start_control_plane

        self.description = await asyncio.to_thread(self._versions)
        self.plane = await asyncio.to_thread(
            start_control_plane,
            self.assets,
            workdir / "kube",
            controller_manager=self.controller_manager,
        )
        self.audit_path = self.plane.workdir / "audit.log"
        # Enough connections for 50 writes in flight plus the phase's watches.
        self.http = httpx.AsyncClient(
            timeout=60.0,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
            **self.plane.admin_client_kwargs(),
        )
        crds = sorted((ROOT / "crds").glob("*.yaml"))
        for path in crds:
            crd = yaml.safe_load(path.read_text())
            await self._apply(
                f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}",
                crd,
            )
        for path in crds:
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            await self._wait_established(name)
        for namespace in (NS, self.OPERATOR_NS):
            await self._apply(
                f"/api/v1/namespaces/{namespace}",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            )
        account = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": OPERATOR_ACCOUNT, "namespace": self.OPERATOR_NS},
        }
        await self._apply(
            f"/api/v1/namespaces/{self.OPERATOR_NS}/serviceaccounts/{OPERATOR_ACCOUNT}", account
        )
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "bench-zenml-operator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": self.OPERATOR_NS}
            ],
        }
        await self._apply(
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/bench-zenml-operator", binding
        )
        response = await self.http.post(
            f"/api/v1/namespaces/{self.OPERATOR_NS}/serviceaccounts/{OPERATOR_ACCOUNT}/token",
            json={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": 24 * 3600},
            },
        )
        response.raise_for_status()
        self.kubeconfig = self.plane.token_kubeconfig(
            response.json()["status"]["token"], "operator"
        )

    async def _apply(self, path: str, body: dict[str, Any]) -> None:
        response = await self.http.patch(
            path,
            content=json.dumps(body),
            params={"fieldManager": "zenml-operator-bench", "force": "true"},
            headers={"Content-Type": "application/apply-patch+yaml"},
        )
        if response.status_code >= 400:
            raise RuntimeError(f"apply {path}: {response.status_code} {response.text[:500]}")

    async def _wait_established(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            response = await self.http.get(
                f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            )
            conditions = (response.json().get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established in {timeout} s")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        for task in self._recorders:
            task.cancel()
        if getattr(self, "http", None) is not None:
            await self.http.aclose()
        if getattr(self, "plane", None) is not None:
            await asyncio.to_thread(self.plane.stop)

    def operator_config(self) -> dict[str, Any]:
        return {"kube_api_url": None}  # the kubeconfig (Kopf's login handler reads it)

    def operator_env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    async def resource_version(self) -> int:
        """The cluster's current resourceVersion (etcd revision): a one-item LIST's."""
        response = await self.http.get(SECRET_PATH, params={"limit": "1"})
        response.raise_for_status()
        return int(response.json()["metadata"]["resourceVersion"])

    async def get(self, res: str, name: str) -> dict[str, Any] | None:
        response = await self.http.get(f"{RES_PATHS[res]}/{name}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def list(self, res: str) -> list[dict[str, Any]]:
        return (await self.list_at(res))[0]

    async def list_at(
        self, res: str, field_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """The objects and the resourceVersion they are current at (a watch resumes there).

        A LIST without resourceVersion is a consistent read, served from etcd here (the watch
        cache cannot prove it is fresh without etcd's progress notifications): never the
        watch cache's wait. Its pages all belong to the first page's snapshot."""
        items: list[dict[str, Any]] = []
        params = {"limit": "500"}
        if field_selector:
            params["fieldSelector"] = field_selector
        version: int | None = None
        while True:
            response = await self.http.get(RES_PATHS[res], params=params)
            response.raise_for_status()
            data = response.json()
            items += data.get("items") or []
            meta = data.get("metadata") or {}
            if version is None:
                version = int(meta["resourceVersion"])
            token = meta.get("continue")
            if not token:
                return items, version
            params = {**params, "continue": token}

    async def get_at(self, res: str, name: str) -> tuple[dict[str, Any] | None, int]:
        """One object (None when absent) and the resourceVersion of the check: a LIST by name,
        which, unlike a GET, also says where a watch can resume when the object is absent."""
        items, version = await self.list_at(res, f"metadata.name={name}")
        return (items[0] if items else None), version

    async def create_all(self, res: str, bodies: list[dict[str, Any]]) -> None:
        """POSTs, 50 in flight (what `kubectl apply` of N manifests amounts to)."""
        sem = asyncio.Semaphore(50)

        async def one(body: dict[str, Any]) -> None:
            async with sem:
                response = await self.http.post(RES_PATHS[res], json=body)
                if response.status_code >= 400:
                    raise RuntimeError(f"create {res}: {response.status_code} {response.text}")

        await asyncio.gather(*(one(body) for body in bodies))

    # The audit log (JSON lines, Metadata level) has every request with its user: the
    # operator's requests by verb and resource, read incrementally from where the last read
    # stopped. A watch is counted once (at ResponseStarted; it may still be open).
    def _read_audit(self) -> collections.Counter[str]:
        marker = f'"username":"{self.user}"'
        with contextlib.suppress(FileNotFoundError), self.audit_path.open("rb") as log:
            log.seek(self._audit_offset)
            data = log.read()
            end = data.rfind(b"\n") + 1
            self._audit_offset += end
            for raw in data[:end].decode(errors="replace").splitlines():
                if marker not in raw:
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    event = json.loads(raw)
                    verb, stage = event["verb"], event["stage"]
                    if stage != ("ResponseStarted" if verb == "watch" else "ResponseComplete"):
                        continue
                    ref = event.get("objectRef") or {}
                    key = _kube_key(verb, ref.get("resource", "?"), ref.get("subresource"))
                    self._audit_counts[key] += 1
                    write = verb in ("create", "update", "patch", "delete", "deletecollection")
                    self._audit_counts["write" if write else "read"] += 1
                    code = int((event.get("responseStatus") or {}).get("code") or 0)
                    if code >= 400:
                        self._audit_counts[f"HTTP {code} on {key}"] += 1
        return collections.Counter(self._audit_counts)

    async def request_mark(self) -> collections.Counter[str]:
        return await asyncio.to_thread(self._read_audit)

    async def requests_since(self, mark: collections.Counter[str]) -> collections.Counter[str]:
        counter = await asyncio.to_thread(self._read_audit)
        counter.subtract(mark)
        return counter

    def cpu(self) -> dict[str, float]:
        result = {
            name: _cpu_seconds(proc.pid)
            for name, proc in self.plane.processes.items()
            if name in ("kube-apiserver", "etcd", "kube-controller-manager")
        }
        result["benchmark"] = _cpu_seconds()
        return result

    async def wait_secret_key(self, name: str, since: int, timeout: float) -> str:
        """A watch on that one Secret from `since` (the create's resourceVersion): it times the
        latency, so a watch, not a poll. After an ERROR, or WATCH_ATTEMPT_SECONDS x 2 without
        the Secret (never in a normal run: it comes within about a second), a LIST by name
        checks for it (see `follow_watch`'s comment); a value found that way is noted, its
        time being the LIST's, not the Secret's."""
        found: list[str] = []

        def take(obj: Mapping[str, Any] | None) -> bool:
            value = secret_key(obj)
            if value is not None:
                found.append(value)
            return bool(found)

        async def recover(last: int | None, code: int | None) -> tuple[bool, int | None]:
            obj, version = await self.get_at(SECRET_RES, name)
            if take(obj):
                self.watch_notes.append(
                    f"Secret {name} found by the LIST fallback after a watch "
                    f"{'ERROR ' + str(code) if code else 'attempt without it'} (its time is late)"
                )
                return True, None
            return False, version

        async with asyncio.timeout(timeout):
            await follow_watch(
                self.http,
                SECRET_PATH,
                since,
                lambda event: event.get("type") != "DELETED" and take(event.get("object")),
                {"fieldSelector": f"metadata.name={name}"},
                recover=recover,
                attempt_timeout=2 * WATCH_ATTEMPT_SECONDS,
            )
        return found[0]

    async def wait_for(
        self, res: str, name: str, check: Callable[[dict[str, Any] | None], bool], timeout: float
    ) -> None:
        """Untimed: a LIST by name checks the object; if it does not pass, a watch from that
        LIST's resourceVersion, re-checked by another LIST after every ERROR, closed stream or
        WATCH_ATTEMPT_SECONDS of silence, all within `timeout` (see `follow_watch`'s comment:
        a watch without resourceVersion can fail for as long as the resource stays idle)."""

        async def recover(last: int | None, code: int | None) -> tuple[bool, int | None]:
            obj, version = await self.get_at(res, name)
            return check(obj), version

        def seen(event: dict[str, Any]) -> bool:
            return check(None if event.get("type") == "DELETED" else event.get("object"))

        async with asyncio.timeout(timeout):
            done, version = await recover(None, None)
            if not done:
                await follow_watch(
                    self.http,
                    RES_PATHS[res],
                    version,
                    seen,
                    {"fieldSelector": f"metadata.name={name}"},
                    recover=recover,
                    attempt_timeout=WATCH_ATTEMPT_SECONDS,
                )

    async def start_recording(self, since: int) -> None:
        """Watches from `since` on the kinds the operator writes in the namespace."""
        self._recorded = []
        self.recording_errors = []

        def recorder(plural: str) -> Callable[[dict[str, Any]], bool]:
            def record(event: dict[str, Any]) -> bool:
                rv = int(
                    ((event.get("object") or {}).get("metadata") or {}).get("resourceVersion") or 0
                )
                self._recorded.append((rv, plural, event))
                return False

            return record

        def recover(plural: str, res: str) -> Recover:
            # The changes are the measure: an ERROR re-opens from the last resourceVersion seen
            # (nothing lost). Only a 410 Gone (that point compacted away) can lose events: then
            # a LIST, whose objects changed after that point are recorded as MODIFIED (a
            # deletion in between would be missed: said in a note).
            async def check(last: int | None, code: int | None) -> tuple[bool, int | None]:
                self.watch_notes.append(f"recording watch on {plural}: ERROR {code}")
                if code != 410:
                    return False, None
                items, version = await self.list_at(res)
                for obj in items:
                    rv = int((obj.get("metadata") or {}).get("resourceVersion") or 0)
                    if rv > (last or 0):
                        self._recorded.append((rv, plural, {"type": "MODIFIED", "object": obj}))
                self.watch_notes.append(
                    f"recording watch on {plural}: 410 Gone from {last}; changes since then"
                    f" taken from a LIST at {version} (deletions in between not seen)"
                )
                return False, version

            return check

        by_path = {path: res for res, path in RES_PATHS.items()}
        self._recorders = [
            asyncio.create_task(
                follow_watch(
                    self.http,
                    path,
                    since,
                    recorder(path.rsplit("/", 1)[1]),
                    recover=recover(path.rsplit("/", 1)[1], by_path[path]),
                )
            )
            for path in (SA_PATH, ROT_PATH, SECRET_PATH, EVENTS_PATH)
        ]

    async def stop_recording(self, until: int) -> list[tuple[str, dict[str, Any]]]:
        await asyncio.sleep(1.0)  # the last events of the window in flight
        for task in self._recorders:
            task.cancel()
        results = await asyncio.gather(*self._recorders, return_exceptions=True)
        self._recorders = []
        self.recording_errors = [
            repr(r)
            for r in results
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        ]
        return [(plural, event) for rv, plural, event in self._recorded if rv <= until]


def choose_kube(args: argparse.Namespace, say: Callable[[str], None]) -> EmulatedKube | RealKube:
    """--kube auto|real|emulated: a real control plane when KUBEBUILDER_ASSETS has one."""
    if args.kube == "emulated":
        return EmulatedKube(args.n)
    sys.path.insert(0, str(ROOT / "tests"))  # tests/control_plane.py
    try:
        from control_plane import HOW_TO_GET_ASSETS, find_assets
    except ImportError as exc:  # its imports (cryptography, yaml) are missing
        if args.kube == "real":
            raise SystemExit(f"--kube real: cannot import tests/control_plane.py: {exc}") from exc
        say(f"  Kubernetes: emulated (tests/control_plane.py unusable: {exc})")
        return EmulatedKube(args.n)
    assets = find_assets()
    if assets is None:
        if args.kube == "real":
            raise SystemExit(f"--kube real: {HOW_TO_GET_ASSETS}")
        say(f"  Kubernetes: emulated; {HOW_TO_GET_ASSETS}")
        return EmulatedKube(args.n)
    return RealKube(assets, controller_manager=args.controller_manager)


class Bench:
    """The driver: ZenML server, emulator, operator processes, baselines, the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n: int = args.n
        self.tag = uuid.uuid4().hex[:5]
        self.rows: list[dict[str, Any]] = []
        self.details: list[str] = []
        self.notes: list[str] = []
        self.peak_rss: list[tuple[str, int]] = []
        self.idle_resync = 0.0

    def say(self, text: str) -> None:
        print(text, flush=True)

    def detail(self, text: str) -> None:
        self.details.append(text)
        self.say(f"      {text}")

    # --------------------------------------------------------------- set-up

    async def run(self) -> int:
        from zenml_devstack.zenml_server import (
            create_service_account_with_key,
            find_zenml_python,
            start_zenml_server,
        )

        args = self.args
        self.machine = machine_info()
        self.load_start = load_average()
        kube_notes: list[str] = []  # chosen first: `--kube real` without binaries exits here
        self.kube = choose_kube(args, kube_notes.append)
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="zenml-bench-")).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        started = time.monotonic()
        self.say(f"zenml-operator benchmark: N={self.n}, work dir {workdir}")
        self.say("  machine: " + "; ".join(f"{k} {v}" for k, v in self.machine.items()))
        self.say(f"  load average at start: {self.load_start}")
        for note in kube_notes:
            self.say(note)

        self.say("[setup] ZenML server (real, from .venv-zenml) ...")
        self.zenml_python = find_zenml_python()
        server = await asyncio.to_thread(start_zenml_server, workdir / "zenml")
        self.server = server
        try:
            self.key = await asyncio.to_thread(
                create_service_account_with_key,
                server.url,
                server.admin_password,
                OPERATOR_ACCOUNT,
            )
            server.grant_admin(OPERATOR_ACCOUNT)
            self.say(f"        ready at {server.url} (pid {server.process.pid})")

            if self.kube.mode == "real":
                self.say("[setup] Kubernetes control plane (real: etcd + kube-apiserver) ...")
            t_kube = time.monotonic()
            try:
                await self.kube.start(workdir)
                self.http = self.kube.http
                self.say(
                    f"        {self.kube.description}, ready in {time.monotonic() - t_kube:.1f} s"
                )
                await self.phases()
            finally:
                await self.kube.stop()
        finally:
            await asyncio.to_thread(server.stop)
        self.load_end = load_average()
        self.elapsed = time.monotonic() - started
        self.report()
        if not args.keep and not args.workdir and not args.profile:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0

    def operator_cfg(self, resync: float) -> dict[str, Any]:
        args = self.args
        return {
            "api_key": self.key,
            "config": {
                "zenml_url": self.server.url,
                **self.kube.operator_config(),
                "resync_seconds": resync,
                "zenml_timeout": args.zenml_timeout,
                "zenml_max_connections": args.max_connections,
                "zenml_heavy_concurrency": args.heavy_concurrency,
                "retry_delay": args.retry_delay,
                "background_rate": args.background_rate,
            },
            "kopf": {
                "worker_limit": args.worker_limit,
                "posting_worker_limit": args.posting_worker_limit,
            },
        }

    def operator_limit(self) -> int:
        """The operator's concurrency toward ZenML: its client's connection pool."""
        if self.args.max_connections is not None:
            return int(self.args.max_connections)
        from zenml_operator.config import OperatorConfig

        field = {f.name: f for f in dataclasses.fields(OperatorConfig)}.get("zenml_max_connections")
        default = field.default if field is not None else 50
        return int(default) if isinstance(default, int) else 50

    def zenml_client(self, *, timeout: float) -> Any:
        from zenml_operator.zenml_api import ZenMLClient

        return ZenMLClient(
            self.server.url,
            self.key,
            timeout=timeout,
            max_connections=self.operator_limit(),
        )

    async def phases(self) -> None:
        skip = set(self.args.skip or ())
        op = OperatorProcess(
            "main",
            self.operator_cfg(MAIN_RESYNC),
            self.workdir,
            self.args.profile,
            env=self.kube.operator_env(),
        )
        op.tracemalloc = self.args.tracemalloc
        self.say(f"[setup] operator process (resync {MAIN_RESYNC:g} s) ...")
        await op.start()
        self.say(f"        ready (pid {op.pid}, RSS {op.start_rss / MB:.0f} MB with 0 objects)")
        try:
            if "latency" not in skip:
                await self.latency(op)
            await self.throughput(op)
            if "cli" not in skip:
                await self.cli()
            if "rotation" not in skip:
                await self.rotation(op)
            if "repair" not in skip:
                await self.repair(op)
            if "servers" not in skip:
                await self.servers(op)
        finally:
            await op.stop()
            self.peak_rss.append(("operator during create/rotate phases", op.hwm))
        # Idle first: its operator's resyncs bring the ServiceAccounts' status up to date
        # after the rotations, so the restart starts from objects converged by a resync.
        if "idle" not in skip:
            await self.idle()
        if "restart" not in skip:
            await self.restart()
        self.memory_row()

    # --------------------------------------------------------------- 1. latency

    async def latency(self, op: OperatorProcess) -> None:
        runs, warmup = self.args.runs, 1
        self.say(
            f"[1/6] latency: one ServiceAccount + one key, {runs} runs each side (+{warmup}"
            " warm-up), alternated"
        )
        client = self.zenml_client(timeout=60.0)
        await client.current_user_name()  # warm: logged in, connection open
        op_times: list[float] = []
        op_secret: list[float] = []
        script_times: list[float] = []
        before = await op.stats()
        try:
            for i in range(warmup + runs):
                # Operator: POST to the Kubernetes API, tight poll for the Secret, log in.
                name = f"lat-{self.tag}-{i}"
                t0 = time.perf_counter()
                response = await self.http.post(SA_PATH, json=sa_body(name))
                response.raise_for_status()
                created_rv = int(response.json()["metadata"]["resourceVersion"])
                value = await self.kube.wait_secret_key(f"{name}-k", created_rv, 120)
                t_secret = time.perf_counter()
                await login_with_api_key(self.server.url, value)
                t1 = time.perf_counter()
                await self.wait_ready_one(name)  # untimed: do not overlap the next run
                # Script: warm client; create account, create key, log in with the key.
                sname = f"lat-script-{self.tag}-{i}"
                t2 = time.perf_counter()
                account = await client.create_service_account(sname)
                issued = await client.create_api_key(account.id, "k")
                await login_with_api_key(self.server.url, issued.value.reveal())
                t3 = time.perf_counter()
                if i >= warmup:
                    op_times.append(t1 - t0)
                    op_secret.append(t_secret - t0)
                    script_times.append(t3 - t2)
        finally:
            await client.aclose()
        delta = (await op.stats()).minus(before)
        op_med, sc_med = statistics.median(op_times), statistics.median(script_times)
        op_p95, sc_p95 = percentile(op_times, 95), percentile(script_times, 95)
        self.add_row(
            "1. Latency, create → Secret's key logs in (median)",
            f"{op_med * 1000:.0f} ms",
            f"{sc_med * 1000:.0f} ms",
            op_med / sc_med,
            "≤ 1.3",
            op_med / sc_med <= 1.3,
            "operator ÷ script; script = warm logged-in client",
        )
        self.add_row(
            "   Latency p95",
            f"{op_p95 * 1000:.0f} ms",
            f"{sc_p95 * 1000:.0f} ms",
            op_p95 / sc_p95,
            "",
            None,
            "",
        )
        self.detail(
            f"operator: median {op_med * 1000:.0f} ms (Secret visible at "
            f"{statistics.median(op_secret) * 1000:.0f} ms, then the login), p95 "
            f"{op_p95 * 1000:.0f} ms, min {min(op_times) * 1000:.0f}, max "
            f"{max(op_times) * 1000:.0f}, stdev {statistics.pstdev(op_times) * 1000:.0f} ms"
        )
        self.detail(
            f"script:   median {sc_med * 1000:.0f} ms, p95 {sc_p95 * 1000:.0f} ms, min "
            f"{min(script_times) * 1000:.0f}, max {max(script_times) * 1000:.0f}, stdev "
            f"{statistics.pstdev(script_times) * 1000:.0f} ms"
        )
        per = warmup + runs
        self.detail(
            f"operator ZenML requests per ServiceAccount: {delta.zenml_requests / per:.1f} "
            f"({self.count_summary(delta.counts, 'zenml ', per)}); script: 3 (create account, "
            "create key, login)"
        )

    async def wait_ready_one(self, name: str, timeout: float = 120) -> None:
        await self.kube.wait_for(SA_RES, name, is_ready, timeout)

    # --------------------------------------------------------------- 2. throughput

    async def watch_until(
        self,
        path: str,
        since: int,
        done: Callable[[dict[str, Any]], bool],
        count: int,
        timeout: float | None = None,
        times: list[float] | None = None,
    ) -> tuple[float, int]:
        """Follow a watch from resourceVersion `since`; return (time, how many) when `count`
        distinct objects satisfied `done`, or at the timeout (default --phase-timeout).
        `times`: gets the time each object was first seen satisfying `done`."""
        finished: set[str] = set()
        t_last = time.perf_counter()
        timeout = self.args.phase_timeout if timeout is None else timeout

        def seen(event: dict[str, Any]) -> bool:
            nonlocal t_last
            obj = event.get("object") or {}
            name = (obj.get("metadata") or {}).get("name")
            if name and name not in finished and done(obj):
                finished.add(name)
                t_last = time.perf_counter()
                if times is not None:
                    times.append(t_last)
            return len(finished) >= count

        res = {p: r for r, p in RES_PATHS.items()}[path]

        async def recover(last: int | None, code: int | None) -> tuple[bool, int | None]:
            # After an ERROR (see `follow_watch`'s comment) the watch alone would re-open from
            # the last resourceVersion seen and lose nothing; the LIST also covers a 410 Gone.
            # Objects first seen there get the LIST's time (later than their change): noted.
            items, version = await self.kube.list_at(res)
            before = len(finished)
            for obj in items:
                seen({"type": "MODIFIED", "object": obj})
            self.kube.watch_notes.append(
                f"watch on {path}: ERROR {code}, re-checked by a LIST"
                + (
                    f" ({len(finished) - before} objects first seen there)"
                    if len(finished) > before
                    else ""
                )
            )
            return len(finished) >= count, version

        try:
            async with asyncio.timeout(timeout):
                await follow_watch(self.http, path, since, seen, recover=recover)
        except TimeoutError:
            self.notes.append(f"watch on {path} timed out after {timeout:.0f} s")
        return t_last, len(finished)

    async def throughput(self, op: OperatorProcess) -> None:
        n, limit = self.n, self.operator_limit()
        self.say(
            f"[2/6] throughput: {n} ServiceAccounts at once vs a REST loop (concurrency {limit})"
        )
        self.loop_accounts: list[str] = []
        t_loop, server_cpu_loop = None, None
        if "loop" not in self.skip:
            t_loop, server_cpu_loop = await self.throughput_loop(n)

        # The operator: all N objects created at once (emulated: in one synchronous step;
        # real: POSTs, 50 in flight, timed with the phase as `kubectl apply` would be).
        self.sa_names = [f"tp-{self.tag}-{i}" for i in range(n)]
        before = await op.stats()
        since, req0 = await self.kube.resource_version(), await self.kube.request_mark()
        kube_cpu0, server_cpu0 = self.kube.cpu(), _cpu_seconds(self.server.process.pid)
        t0 = time.perf_counter()
        watcher = asyncio.create_task(self.watch_until(SA_PATH, since, is_ready, n))
        await self.kube.create_all(SA_RES, [sa_body(name) for name in self.sa_names])
        t_created = time.perf_counter() - t0
        t_end, ready = await watcher
        t_op = t_end - t0
        delta = (await op.stats()).minus(before)
        kube_cpu = self.kube_cpu(kube_cpu0)
        server_cpu = _cpu_seconds(self.server.process.pid) - server_cpu0
        self.throughput_op = (ready, t_op)
        reasons = await self.event_reasons(since)
        self.detail(
            f"operator: {ready}/{n} Ready in {t_op:.1f} s ({ready / t_op:.2f}/s; all created"
            f" after {t_created:.1f} s); CPU: operator {delta.cpu:.1f} s, ZenML server "
            f"{server_cpu:.1f} s, {kube_cpu}"
        )
        self.detail(
            f"operator ZenML requests per object: {delta.zenml_requests / n:.2f} "
            f"({self.count_summary(delta.counts, 'zenml ', n)})"
        )
        self.detail(f"kube requests per object: {await self.kube_summary(req0, n)}")
        if reasons:
            self.detail(
                "Events during the phase: " + ", ".join(f"{k} {v}" for k, v in reasons.items())
            )
        op_rate = ready / t_op
        loop_rate = n / t_loop if t_loop else None
        self.add_row(
            f"2. Throughput, {n} ServiceAccounts at once → all Ready",
            f"{op_rate:.2f}/s ({t_op:.0f} s)",
            f"{loop_rate:.2f}/s ({t_loop:.0f} s)" if loop_rate and t_loop else "(skipped)",
            op_rate / loop_rate if loop_rate else None,
            "≥ 0.8",
            ready == n and (loop_rate is None or op_rate / loop_rate >= 0.8),
            f"REST loop, same calls, concurrency {limit}",
        )
        if server_cpu_loop:
            self.add_row(
                "   Throughput: ZenML server CPU per ServiceAccount",
                f"{server_cpu / n * 1000:.0f} ms",
                f"{server_cpu_loop / n * 1000:.0f} ms (loop)",
                server_cpu / server_cpu_loop,
                "≤ 1.10",
                server_cpu / server_cpu_loop <= 1.10,
                f"operator CPU {delta.cpu / n * 1000:.0f} ms per ServiceAccount; Kubernetes"
                f" side: {kube_cpu}",
            )
        await self.check_logins(self.sa_names[:: max(1, n // 5)][:5], "throughput")

    async def throughput_loop(self, n: int) -> tuple[float, float]:
        """The baseline: a plain asyncio loop of the same calls, with the same concurrency as
        the operator's ZenML client (its connection pool), and a generous timeout (a script
        would not give up). Returns (seconds, ZenML server CPU seconds)."""
        loop_client = self.zenml_client(timeout=600.0)
        await loop_client.current_user_name()
        errors = 0

        async def one(i: int) -> None:
            nonlocal errors
            try:
                account = await loop_client.create_service_account(f"tp-loop-{self.tag}-{i}")
                await loop_client.create_api_key(account.id, "k")
                self.loop_accounts.append(account.id)
            except Exception:
                errors += 1

        server_cpu0 = _cpu_seconds(self.server.process.pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        t_loop = time.perf_counter() - t0
        server_cpu_loop = _cpu_seconds(self.server.process.pid) - server_cpu0
        await loop_client.aclose()
        self.detail(
            f"REST loop: {n} accounts + keys in {t_loop:.1f} s ({n / t_loop:.2f}/s), "
            f"{errors} errors; ZenML server CPU {server_cpu_loop:.1f} s"
        )
        return t_loop, server_cpu_loop

    async def check_logins(self, names: Iterable[str], what: str, url: str | None = None) -> None:
        """Sampled Secrets' keys tried against ZenML (`url`: another server than the default)."""
        checked = failed = 0
        for name in names:
            value = secret_key(await self.kube.get(SECRET_RES, f"{name}-k"))
            checked += 1
            try:
                if value is None:
                    raise ValueError("no key")
                await login_with_api_key(url or self.server.url, value)
            except Exception:
                failed += 1
        self.detail(f"{what}: {checked - failed}/{checked} sampled Secrets log in to ZenML")
        if failed:
            self.notes.append(f"{what}: {failed} of {checked} sampled Secret keys did NOT log in")

    async def event_reasons(self, since: int) -> dict[str, int]:
        """Reasons of the Kubernetes Events posted since resourceVersion `since`."""
        counter: collections.Counter[str] = collections.Counter()
        for event in await self.kube.list("v1/events"):
            rv = int(event["metadata"].get("resourceVersion") or 0)
            if rv > since:
                counter[f"{event.get('type', '?')}/{event.get('reason', '?')}"] += 1
        return dict(counter.most_common())

    async def kube_summary(self, start: collections.Counter[str], per: float) -> str:
        """Kubernetes requests since the `start` counts, per object: the emulator's served
        requests (all clients), or the operator's own from the real apiserver's audit log."""
        return self.format_kube(await self.kube.requests_since(start), per)

    def format_kube(self, counter: Mapping[str, int], per: float) -> str:
        kinds = [
            (k, v)
            for k, v in counter.most_common()
            if v > 0 and k not in ("read", "write") and not k.startswith("HTTP ")
        ]
        text = ", ".join(f"{k} {v / per:.2f}" for k, v in kinds[:10]) or "none"
        errors = [(k, v) for k, v in counter.most_common() if v > 0 and k.startswith("HTTP ")]
        if errors:
            text += "; errors: " + ", ".join(f"{k} x{v}" for k, v in errors[:6])
        return text

    def kube_cpu(self, before: Mapping[str, float]) -> str:
        """The Kubernetes side's CPU since `before`: the emulator (with the benchmark), or
        kube-apiserver, etcd (and the controller manager) and the benchmark apart."""
        after = self.kube.cpu()
        return ", ".join(f"{k} {after[k] - before.get(k, 0.0):.1f} s" for k in after)

    def count_summary(self, counts: Mapping[str, int], prefix: str, per: int) -> str:
        items = sorted(
            ((k[len(prefix) :], v) for k, v in counts.items() if k.startswith(prefix)),
            key=lambda kv: -kv[1],
        )
        return ", ".join(f"{k} {v / per:.2f}" for k, v in items) or "none"

    # --------------------------------------------------------------- 2b. CLI

    async def cli(self) -> None:
        runs = self.args.cli_runs
        zenml_bin = str(Path(self.zenml_python).parent / "zenml")
        self.say(f"[2/6] throughput: `zenml service-account create`, {runs} timed runs (+1)")
        config_dir = self.workdir / "cli-config"
        config_dir.mkdir(exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ZENML_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
        }
        # Non-interactive: the documented env login with the operator's (admin) API key.
        env.update(
            ZENML_STORE_URL=self.server.url,
            ZENML_STORE_API_KEY=self.key,
            ZENML_CONFIG_PATH=str(config_dir),
            ZENML_ANALYTICS_OPT_IN="false",
        )

        def one(i: int) -> float:
            t0 = time.perf_counter()
            done = subprocess.run(
                [zenml_bin, "service-account", "create", f"cli-{self.tag}-{i}"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # it prints the key: never show it
                stderr=subprocess.DEVNULL,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"zenml service-account create failed ({done.returncode})")
            return time.perf_counter() - t0

        await asyncio.to_thread(one, -1)  # first run initialises the CLI's global config
        times = [await asyncio.to_thread(one, i) for i in range(runs)]
        mean = statistics.mean(times)
        n = self.n
        ready, t_op = self.throughput_op
        op_rate, cli_rate = ready / t_op, 1 / mean
        self.detail(
            f"CLI: mean {mean:.2f} s per account (min {min(times):.2f}, max {max(times):.2f});"
            f" extrapolated to {n}: {n * mean:.0f} s"
        )
        self.add_row(
            f"   Throughput vs `zenml service-account create` x{n}",
            f"{op_rate:.2f}/s ({t_op:.0f} s)",
            f"{cli_rate:.2f}/s ({n * mean:.0f} s, extrapolated)",
            op_rate / cli_rate,
            "≥ 20",
            op_rate / cli_rate >= 20,
            f"CLI: {runs} sequential runs, env login (ZENML_STORE_URL/API_KEY)",
        )

    # --------------------------------------------------------------- 5. rotation

    async def rotation(self, op: OperatorProcess) -> None:
        n, limit = self.n, self.operator_limit()
        self.say(f"[5/6] rotation fan-out: {n} keys due at once vs a loop of key creates")
        accounts = self.loop_accounts[:n]
        t_loop, server_cpu_loop = None, None
        if accounts:  # the throughput loop's accounts (none with --skip loop)
            t_loop, server_cpu_loop = await self.rotation_loop(accounts)

        # Set-up (timed apart): N ApiKeyRotations, each converged (Ready, Scheduled).
        names = [f"rot-{self.tag}-{i}" for i in range(n)]
        since = await self.kube.resource_version()
        t0 = time.perf_counter()
        watcher = asyncio.create_task(self.watch_until(ROT_PATH, since, is_ready, n))
        bodies = [rotation_body(name, sa) for name, sa in zip(names, self.sa_names, strict=True)]
        await self.kube.create_all(ROT_RES, bodies)
        t_setup, scheduled = await watcher
        self.detail(
            f"set-up: {scheduled}/{n} ApiKeyRotations Ready (Scheduled) in {t_setup - t0:.1f} s"
        )
        secrets = {s["metadata"]["name"]: s for s in await self.kube.list(SECRET_RES)}
        old_ids = {}
        for sa_name in self.sa_names:
            secret = secrets.get(f"{sa_name}-k") or {}
            old_ids[f"{sa_name}-k"] = (secret.get("metadata", {}).get("annotations") or {}).get(
                ANN_KEY_ID
            )

        def rotated(secret: dict[str, Any]) -> bool:
            meta = secret.get("metadata") or {}
            name = meta.get("name")
            if name not in old_ids:
                return False
            new_id = (meta.get("annotations") or {}).get(ANN_KEY_ID)
            return bool(new_id) and new_id != old_ids[name] and secret_key(secret) is not None

        # The fan-out: every rotation asked for one rotation now (the on-demand annotation).
        before = await op.stats()
        since, req0 = await self.kube.resource_version(), await self.kube.request_mark()
        server_cpu0, kube_cpu0 = _cpu_seconds(self.server.process.pid), self.kube.cpu()
        patch = {"metadata": {"annotations": {ROTATE_ANNOTATION: f"bench-{self.tag}"}}}
        t0 = time.perf_counter()
        watcher = asyncio.create_task(self.watch_until(SECRET_PATH, since, rotated, n))
        sem = asyncio.Semaphore(50)

        async def annotate(name: str) -> None:
            async with sem:
                response = await self.http.patch(
                    f"{ROT_PATH}/{name}",
                    json=patch,
                    headers={"Content-Type": "application/merge-patch+json"},
                )
                response.raise_for_status()

        await asyncio.gather(*(annotate(name) for name in names))
        t_end, done = await watcher
        t_op = t_end - t0
        delta = (await op.stats()).minus(before)
        server_cpu = _cpu_seconds(self.server.process.pid) - server_cpu0
        kube_cpu = self.kube_cpu(kube_cpu0)
        self.detail(
            f"operator: {done}/{n} Secrets hold a new key in {t_op:.1f} s ({done / t_op:.2f}/s);"
            f" CPU: operator {delta.cpu:.1f} s, ZenML server {server_cpu:.1f} s, {kube_cpu}"
        )
        self.detail(
            f"operator ZenML requests per rotation: {delta.zenml_requests / n:.2f} "
            f"({self.count_summary(delta.counts, 'zenml ', n)})"
        )
        self.detail(f"kube requests per rotation: {await self.kube_summary(req0, n)}")
        reasons = await self.event_reasons(since)
        if reasons:
            self.detail(
                "Events during the phase: " + ", ".join(f"{k} {v}" for k, v in reasons.items())
            )
        await self.check_logins(self.sa_names[:: max(1, n // 5)][:5], "rotation")
        op_rate = done / t_op
        loop_rate = len(accounts) / t_loop if t_loop else None
        self.add_row(
            f"5. Rotation fan-out, {n} keys due at once → Secrets hold new keys",
            f"{op_rate:.2f}/s ({t_op:.0f} s)",
            f"{loop_rate:.2f}/s ({t_loop:.0f} s)" if loop_rate and t_loop else "(skipped)",
            op_rate / loop_rate if loop_rate else None,
            "≥ 0.9",
            done == n and (loop_rate is None or op_rate / loop_rate >= 0.9),
            f"loop of ZenML key creates, concurrency {limit}",
        )
        if server_cpu_loop:
            per_loop = server_cpu_loop / len(accounts)
            self.add_row(
                "   Rotation: ZenML server CPU per rotation",
                f"{server_cpu / n * 1000:.0f} ms",
                f"{per_loop * 1000:.0f} ms (loop)",
                server_cpu / n / per_loop,
                "≤ 1.10",
                server_cpu / n / per_loop <= 1.10,
                f"operator CPU {delta.cpu / n * 1000:.0f} ms per rotation; Kubernetes side:"
                f" {kube_cpu}",
            )
        self.rotations = n

    async def rotation_loop(self, accounts: list[str]) -> tuple[float, float]:
        """The baseline: a plain loop of N key creates (what a rotation costs ZenML), with
        the operator's concurrency. Returns (seconds, ZenML server CPU seconds)."""
        client = self.zenml_client(timeout=600.0)
        await client.current_user_name()
        errors = 0

        async def one(account_id: str) -> None:
            nonlocal errors
            try:
                await client.create_api_key(account_id, "k.r1")
            except Exception:
                errors += 1

        server_cpu0 = _cpu_seconds(self.server.process.pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(a) for a in accounts))
        t_loop = time.perf_counter() - t0
        server_cpu_loop = _cpu_seconds(self.server.process.pid) - server_cpu0
        await client.aclose()
        self.detail(
            f"key-create loop: {len(accounts)} keys in {t_loop:.1f} s "
            f"({len(accounts) / t_loop:.2f}/s), {errors} errors; ZenML server CPU "
            f"{server_cpu_loop:.1f} s"
        )
        return t_loop, server_cpu_loop

    # --------------------------------------------------------------- 6. restart

    def converged_counts(self) -> tuple[int, int]:
        """ServiceAccounts (throughput + latency phases) and ApiKeyRotations that exist."""
        n_sa = len(self.sa_names) + (self.args.runs + 1 if "latency" not in self.skip else 0)
        return n_sa, getattr(self, "rotations", 0)

    def background_rate(self) -> float:
        if self.args.background_rate is not None:
            return float(self.args.background_rate)
        from zenml_operator.config import OperatorConfig

        default = OperatorConfig(zenml_url="", zenml_api_key=str)
        return float(getattr(default, "background_rate", 0.0))

    async def restart(self) -> None:
        """A fresh operator process over the converged objects (what an upgrade, a node drain
        or a crash does): ZenML requests per object, their peak rate as ZenML sees them, and
        a ServiceAccount created during the wave; against a REST loop that reads each
        account's key list once (the least a script checking N accounts does)."""
        n_sa, n_rot = self.converged_counts()
        rate, limit = self.background_rate(), self.operator_limit()
        self.say(
            f"[6/6] restart: fresh operator over {n_sa} ServiceAccounts + {n_rot} ApiKeyRotations"
            f" (background rate {rate:g}/s) vs a REST loop of one key-list read per account"
        )
        accounts = [
            str((obj.get("status") or {}).get("accountId"))
            for obj in await self.kube.list(SA_RES)
            if (obj.get("status") or {}).get("accountId")
        ]
        from zenml_operator.zenml_api import ZenMLClient

        loop_bins: collections.Counter[int] = collections.Counter()

        def observe(method: str, route: str, status: int | None, seconds: float) -> None:
            loop_bins[int(time.time() - seconds)] += 1

        client = ZenMLClient(
            self.server.url, self.key, timeout=600.0, max_connections=limit, observer=observe
        )
        await client.current_user_name()
        loop_bins.clear()
        server_cpu0 = _cpu_seconds(self.server.process.pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(client.list_api_keys(a) for a in accounts))
        t_loop = time.perf_counter() - t0
        server_cpu_loop = _cpu_seconds(self.server.process.pid) - server_cpu0
        await client.aclose()
        loop_peak = max(loop_bins.values(), default=0)
        self.detail(
            f"REST loop: {len(accounts)} key-list reads in {t_loop:.1f} s (concurrency {limit}),"
            f" peak {loop_peak} requests/s; ZenML server CPU {server_cpu_loop:.1f} s"
        )

        probe = f"restart-probe-{self.tag}"
        rv0, req0 = await self.kube.resource_version(), await self.kube.request_mark()
        await self.kube.start_recording(rv0)
        server_cpu0, kube_cpu0 = _cpu_seconds(self.server.process.pid), self.kube.cpu()
        op = OperatorProcess(
            "restart",
            self.operator_cfg(600.0),
            self.workdir,
            self.args.profile,
            env=self.kube.operator_env(),
        )
        t_start = time.time()
        try:
            await op.start()
            t_ready = time.time()
            # A new object during the wave: it must not wait for the wave.
            t_probe = await self.create_until_ready(probe)
            t_probe_ready = time.time()
            deadline = time.perf_counter() + self.args.phase_timeout
            while True:  # the wave: every object looked at once (the probe: at least once)
                stats = await op.stats()
                sa_runs = stats.counts.get("reconcile serviceaccount", 0)
                rot_runs = stats.counts.get("reconcile rotation", 0)
                if sa_runs >= n_sa + 1 and rot_runs >= n_rot:
                    break
                if time.perf_counter() > deadline:
                    self.notes.append("restart: the wave did not finish in time")
                    break
                await asyncio.sleep(0.25)
            t_wave = time.time()
            await asyncio.sleep(3.0)  # anything still on its way shows in the counts below
            after = await op.stats()
            t_end = time.time()
            server_cpu = _cpu_seconds(self.server.process.pid) - server_cpu0
            kube_cpu = self.kube_cpu(kube_cpu0)
            kube_delta = await self.kube.requests_since(req0)
            # The same create on the same operator once the wave is over: the reference.
            t_control = await self.create_until_ready(f"{probe}-after")
            recorded = await self.kube.stop_recording(await self.kube.resource_version())
        finally:
            await op.stop()
            self.peak_rss.append(("operator in the restart phase", op.hwm))

        def about_probe(kind: str, event: Mapping[str, Any]) -> bool:
            obj = event.get("object") or {}
            name = (obj.get("involvedObject") if kind == "events" else obj.get("metadata")) or {}
            return str(name.get("name", "")).startswith(probe)

        changes = [
            self.describe_change(kind, event)
            for kind, event in recorded
            if not about_probe(kind, event)
        ]
        counts = after.counts

        def total(prefix: str) -> int:
            return sum(v for k, v in counts.items() if k.startswith(prefix))

        probe_calls = total("zenml serviceaccount POST ")  # the probe's create account + key
        per_sa = (total("zenml serviceaccount ") - probe_calls) / max(1, n_sa)
        per_rot = total("zenml rotation ") / max(1, n_rot) if n_rot else 0.0
        window = range(int(t_start), int(t_end) + 1)
        bins_bg = {t: after.per_second.get("background", {}).get(t, 0) for t in window}
        bins_all = {t: after.per_second.get("all", {}).get(t, 0) for t in window}
        peak_bg, peak_all = max(bins_bg.values(), default=0), max(bins_all.values(), default=0)
        busy = [t for t, v in bins_bg.items() if v]
        spread = (busy[-1] - busy[0] + 1) if busy else 0
        mean_bg = sum(bins_bg.values()) / spread if spread else 0.0
        wave = t_wave - t_ready
        self.detail(
            f"operator: ready {t_ready - t_start:.1f} s after its start (login, Kopf's listing);"
            f" the wave (every object looked at once) ended {wave:.1f} s later; background"
            f" ZenML requests over {spread} s: mean {mean_bg:.1f}/s, peak {peak_bg}/s (all:"
            f" peak {peak_all}/s); CPU: operator {after.cpu:.1f} s (with its start-up), ZenML"
            f" server {server_cpu:.1f} s, {kube_cpu}"
        )
        self.detail(
            f"ZenML requests per ServiceAccount: {per_sa:.2f} "
            f"({self.count_summary(counts, 'zenml serviceaccount ', max(1, n_sa))}, of which"
            f" the probe's {probe_calls} POSTs); per ApiKeyRotation: {per_rot:.2f}; other (the"
            f" operator's login and identity check): {total('zenml other ')}"
        )
        self.detail(
            f"kube requests per object: {self.format_kube(kube_delta, max(1, n_sa + n_rot))}"
        )
        if changes:
            shown = collections.Counter(changes)
            self.detail(
                "Kubernetes changes in the wave (the probe's apart): "
                + "; ".join(f"{k} x{v}" for k, v in shown.most_common(8))
            )
        before_wave_end = t_probe_ready <= t_wave
        self.detail(
            f"probe: a ServiceAccount created as soon as the operator was ready: Ready after"
            f" {t_probe:.2f} s, {'before' if before_wave_end else 'after'} the wave ended; the"
            f" same create after the wave: {t_control:.2f} s"
        )
        self.add_row(
            f"6. Restart over {n_sa} ServiceAccounts + {n_rot} ApiKeyRotations: ZenML"
            " requests per ServiceAccount / per ApiKeyRotation",
            f"{per_sa:.2f} / {per_rot:.2f}",
            "1 / —",
            None,
            "≤ 1",
            per_sa <= 1.0 and per_rot <= 1.0,
            f"REST loop: one key-list read per account ({len(accounts)} reads in"
            f" {t_loop:.1f} s); Kubernetes changes besides the probe's: {len(changes)}",
        )
        self.add_row(
            "   Restart: peak ZenML requests/s (background work)",
            f"{peak_bg}/s (mean {mean_bg:.1f}/s over {spread} s)",
            f"{loop_peak}/s (loop, unpaced)",
            None,
            f"≤ {rate:g}/s + 1" if rate > 0 else "",
            (peak_bg <= rate + 1) if rate > 0 else None,
            f"ZENML_OPERATOR_BACKGROUND_RATE {rate:g}; all requests incl. the probe's and the"
            f" login: peak {peak_all}/s",
        )
        self.add_row(
            "   Restart: a new ServiceAccount created during the wave → Ready",
            f"{t_probe * 1000:.0f} ms",
            f"{t_control * 1000:.0f} ms (the same create after the wave)",
            t_probe / t_control,
            "not queued behind the wave",
            before_wave_end or t_probe <= 1.5 * t_control,
            f"the wave lasted {wave:.1f} s after the operator was ready; the probe was Ready"
            f" {'before' if before_wave_end else 'after'} it ended",
        )

    async def create_until_ready(self, name: str, timeout: float = 120) -> float:
        """POST a ServiceAccount with one key; seconds until it is Ready. Polled, not
        watched: a watch opened while the apiserver's watch cache lags (a loaded machine)
        can answer 'Too large resource version' for seconds."""
        t0 = time.perf_counter()
        response = await self.http.post(SA_PATH, json=sa_body(name))
        response.raise_for_status()
        while not is_ready(await self.kube.get(SA_RES, name)):
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{name} not Ready in {timeout:.0f} s")
            await asyncio.sleep(0.05)
        return time.perf_counter() - t0

    # --------------------------------------------------------------- 3. idle

    async def idle(self) -> None:
        intervals = self.args.idle_intervals
        n_sa, n_rot = self.converged_counts()
        resync = self.args.resync
        if resync is None:
            # Short, but at half of the background rate (20/s by default; one ZenML server
            # serves ~40 small GETs/s on 2 cores): a resync is 1 read per ServiceAccount and
            # none per idle rotation. A shorter interval measures the rate limit, not idle cost.
            rate = self.background_rate() or 20.0
            resync = max(5.0, float(math.ceil(n_sa / (rate / 2))))
        self.say(
            f"[3/6] idle cost: fresh operator, resync {resync:g} s, {n_sa} ServiceAccounts + "
            f"{n_rot} ApiKeyRotations converged; {intervals} intervals measured"
        )
        self.idle_resync = resync
        op = OperatorProcess(
            "idle",
            self.operator_cfg(resync),
            self.workdir,
            self.args.profile,
            env=self.kube.operator_env(),
        )
        t_start = time.perf_counter()
        await op.start()
        try:
            # Let the start-up wave (resume handlers, first looks) and the first resync end.
            deadline = time.perf_counter() + self.args.phase_timeout
            while True:
                stats = await op.stats()
                sa_runs = stats.counts.get("reconcile serviceaccount", 0)
                rot_runs = stats.counts.get("reconcile rotation", 0)
                if sa_runs >= 2 * n_sa and rot_runs >= 2 * n_rot:
                    break
                if time.perf_counter() > deadline:
                    self.notes.append("idle: the first resync pass did not finish in time")
                    break
                await asyncio.sleep(0.5)
            self.detail(
                f"start-up wave + first resync done {time.perf_counter() - t_start:.1f} s after"
                " start"
            )
            before = await op.stats()
            rv0, req0 = await self.kube.resource_version(), await self.kube.request_mark()
            await self.kube.start_recording(rv0)
            server_cpu0, kube_cpu0 = _cpu_seconds(self.server.process.pid), self.kube.cpu()
            t0 = time.perf_counter()
            await asyncio.sleep(resync * intervals)
            after = await op.stats()
            window = time.perf_counter() - t0
            delta = after.minus(before)
            server_cpu = _cpu_seconds(self.server.process.pid) - server_cpu0
            kube_cpu = self.kube_cpu(kube_cpu0)
            rv1 = await self.kube.resource_version()
            kube_delta = await self.kube.requests_since(req0)
            changes = [
                self.describe_change(kind, event)
                for kind, event in await self.kube.stop_recording(rv1)
            ]
        finally:
            await op.stop()
            self.peak_rss.append(("operator in the idle phase (start-up wave + resyncs)", op.hwm))
        cycles = window / resync
        kube_writes = len(changes)
        recorded = not self.kube.recording_errors
        for error in self.kube.recording_errors:
            self.notes.append(f"idle: a watch recording the changes failed: {error}")
        if changes:
            shown = collections.Counter(changes)
            self.detail(
                "Kubernetes changes in the idle window: "
                + "; ".join(f"{k} x{v}" for k, v in shown.most_common(8))
            )
        kube_write_requests = kube_delta["write"]
        sa_runs = delta.counts.get("reconcile serviceaccount", 0)
        rot_runs = delta.counts.get("reconcile rotation", 0)

        def zenml_reads(kind: str) -> int:
            return sum(v for k, v in delta.counts.items() if k.startswith(f"zenml {kind} GET "))

        def zenml_all(kind: str) -> int:
            return sum(v for k, v in delta.counts.items() if k.startswith(f"zenml {kind} "))

        # Per resync run (each object runs once per interval when the operator keeps up), and
        # per object per elapsed interval (lower when it does not keep up).
        sa_reads = zenml_reads("serviceaccount") / max(1, sa_runs)
        rot_reads = zenml_reads("rotation") / max(1, rot_runs) if n_rot else 0.0
        sa_interval = zenml_reads("serviceaccount") / max(1, n_sa) / cycles
        rot_interval = zenml_reads("rotation") / max(1, n_rot) / cycles if n_rot else 0.0
        self.detail(
            f"window {window:.1f} s = {cycles:.2f} intervals; reconciles per object per "
            f"interval: ServiceAccount {sa_runs / max(1, n_sa) / cycles:.2f}, ApiKeyRotation "
            f"{rot_runs / max(1, n_rot) / cycles:.2f}" + ("" if n_rot else " (none)")
        )
        self.detail(
            f"ZenML per ServiceAccount resync: "
            f"{self.count_summary(delta.counts, 'zenml serviceaccount ', max(1, sa_runs))}"
        )
        if n_rot:
            self.detail(
                f"ZenML per ApiKeyRotation look: "
                f"{self.count_summary(delta.counts, 'zenml rotation ', max(1, rot_runs))}"
            )
        non_get = (
            zenml_all("serviceaccount")
            + zenml_all("rotation")
            - (zenml_reads("serviceaccount") + zenml_reads("rotation"))
        )
        self.detail(
            f"ZenML requests in the window: {delta.zenml_requests} total, {non_get} not GET; "
            f"ZenML server CPU {server_cpu:.1f} s ({server_cpu / window * 100:.0f}% of a core);"
            f" operator CPU {delta.cpu:.1f} s ({delta.cpu / window * 100:.0f}% of a core)"
        )
        per_obj = max(1, n_sa + n_rot) * cycles
        self.detail(f"Kubernetes side CPU in the window: {kube_cpu}")
        self.detail(
            "kube requests per object per interval: " + self.format_kube(kube_delta, per_obj)
        )
        self.add_row(
            f"3. Idle: Kubernetes writes per resync interval ({n_sa + n_rot} objects)",
            f"{kube_writes / cycles:.1f}",
            "0",
            None,
            "0",
            kube_writes == 0 and kube_write_requests == 0 and recorded,
            ("" if recorded else "watch recording FAILED (see NOTE); ")
            + f"{self.kube.changes_label} {kube_writes}, write requests {kube_write_requests}"
            f" ({self.kube.counted_as}), over {cycles:.1f} intervals of {resync:g} s",
        )
        self.add_row(
            "   Idle: ZenML reads per ServiceAccount per resync",
            f"{sa_reads:.2f}",
            "1",
            None,
            "≤ 1",
            sa_reads <= 1.0,
            f"{sa_interval:.2f} per object per elapsed interval; "
            f"{sa_runs / max(1, n_sa) / cycles:.2f} resyncs per object per interval",
        )
        if n_rot:
            self.add_row(
                "   Idle: ZenML reads per ApiKeyRotation per resync",
                f"{rot_reads:.2f}",
                "1",
                None,
                "≤ 1",
                rot_reads <= 1.0,
                f"{rot_interval:.2f} per object per elapsed interval; a rotation is looked at every"
                " resync interval",
            )

    def describe_change(self, kind: str, event: Mapping[str, Any]) -> str:
        """One change (a watch event), for the idle report: kind, event, the Ready reason."""
        obj = event.get("object") or {}
        what = f"{kind} {event.get('type')}"
        if kind == "events":
            return f"{what} {obj.get('type')}/{obj.get('reason')}"
        cond = ready_condition(obj)
        if cond:
            what += f" Ready={cond.get('status')}/{cond.get('reason')}"
        return what

    # --------------------------------------------------------------- repair

    async def repair(self, op: OperatorProcess) -> None:
        """Time from a managed Secret deleted, or its value replaced (by another account's
        key, as a paste would), to a Secret whose key logs in to ZenML again: on the idle
        operator, then while N other ServiceAccounts are being created. The operator's resync
        is MAIN_RESYNC: only its Secret watch repairs within these times. The N ServiceAccounts are
        deleted again at the end, so the later phases see the same objects."""
        samples = max(1, self.args.repair_samples)
        n = self.n
        names = list(self.sa_names)
        if len(names) < 4 * samples:
            self.notes.append(f"repair: {len(names)} ServiceAccounts, fewer samples")
            samples = max(1, len(names) // 4)
        self.say(
            f"[repair] {samples} Secrets deleted and {samples} values replaced, idle; then"
            f" as many while {n} ServiceAccounts are being created"
        )
        before = await op.stats()
        idle: dict[str, list[tuple[float, float]]] = {"deleted": [], "replaced": []}
        for i in range(samples):
            idle["deleted"].append(await self.time_repair(names[i], "delete", names[-1 - i]))
            idle["replaced"].append(
                await self.time_repair(names[samples + i], "replace", names[-1 - i])
            )
        delta = (await op.stats()).minus(before)
        self.detail(
            f"idle: ZenML requests per repair {delta.zenml_requests / (2 * samples):.1f} "
            f"({self.count_summary(delta.counts, 'zenml ', 2 * samples)})"
        )

        # Busy: N creates in flight; the damages start once the first ones are Ready.
        busy_names = [f"rep-{self.tag}-{i}" for i in range(n)]
        since = await self.kube.resource_version()
        t0 = time.perf_counter()
        watcher = asyncio.create_task(self.watch_until(SA_PATH, since, is_ready, n))
        creator = asyncio.create_task(
            self.kube.create_all(SA_RES, [sa_body(name) for name in busy_names])
        )
        await self.kube.wait_for(SA_RES, busy_names[0], is_ready, self.args.phase_timeout)
        busy: dict[str, list[tuple[float, float]]] = {"deleted": [], "replaced": []}
        for i in range(samples):
            if watcher.done():
                break
            j = 2 * samples + i
            busy["deleted"].append(await self.time_repair(names[j], "delete", names[-1 - i]))
            if watcher.done():
                break
            busy["replaced"].append(
                await self.time_repair(names[j + samples], "replace", names[-1 - i])
            )
        still_creating = not watcher.done()
        await creator
        t_end, ready = await watcher
        self.detail(
            f"busy: {ready}/{n} ServiceAccounts Ready in {t_end - t0:.1f} s; the repairs ran"
            f" {'while creates were in flight' if still_creating else 'partly after them'}"
        )

        def cell(values: list[float]) -> str:
            if not values:
                return "(none)"
            return f"{statistics.median(values):.1f} / {max(values):.1f} s"

        for kind in ("deleted", "replaced"):
            values_idle, values_busy = idle[kind], busy[kind]
            logins = [login for _, login in values_idle + values_busy]
            self.add_row(
                f"7. Repair: Secret {kind} → its key logs in again (median / max;"
                f" idle | {n} being created)",
                f"{cell([v for _, v in values_idle])} | {cell([v for _, v in values_busy])}",
                "600 s (the default resync)",
                None,
                "< 5 s",
                bool(values_busy) and all(v < 5.0 for v in logins),
                f"{len(values_idle)} idle + {len(values_busy)} busy samples; the repaired"
                f" Secret was written after {cell([w for w, _ in values_idle])} |"
                f" {cell([w for w, _ in values_busy])} (the rest: ZenML's login with it)",
            )
        await self.delete_all(busy_names)

    async def time_repair(self, name: str, how: str, donor: str) -> tuple[float, float]:
        """Damage the Secret of `name` (delete it, or write `donor`'s key into it); return the
        seconds until it holds another value, and until that value logs in."""
        path = f"{SECRET_PATH}/{name}-k"
        old = secret_key(await self.kube.get(SECRET_RES, f"{name}-k"))
        wrong = (await self.kube.get(SECRET_RES, f"{donor}-k") or {}).get("data", {})
        t0 = time.perf_counter()
        if how == "delete":
            response = await self.http.delete(path)
        else:
            response = await self.http.patch(
                path,
                json={"data": {"ZENML_STORE_API_KEY": wrong["ZENML_STORE_API_KEY"]}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
        response.raise_for_status()
        bad = {old, secret_key({"data": wrong})}
        deadline = t0 + 120
        written: dict[str, float] = {}
        while time.perf_counter() < deadline:
            value = secret_key(await self.kube.get(SECRET_RES, f"{name}-k"))
            if value is not None and value not in bad:
                from zenml_operator.zenml_api import UnauthorizedError

                written.setdefault(value, time.perf_counter() - t0)
                try:
                    await login_with_api_key(self.server.url, value)
                except UnauthorizedError:
                    bad.add(value)  # a value ZenML refuses: wait for the next one
                except Exception:  # the server too busy to answer in time: ask again
                    pass
                else:
                    return written[value], time.perf_counter() - t0
            await asyncio.sleep(0.02)
        self.notes.append(f"repair: {name} ({how}) not repaired within 120 s")
        return float("inf"), float("inf")

    async def delete_all(self, names: list[str], phase: str = "repair") -> None:
        """Delete ServiceAccounts and wait until they are gone (finalizers released)."""
        gate = asyncio.Semaphore(20)

        async def one(name: str) -> None:
            async with gate:
                await self.http.delete(f"{SA_PATH}/{name}")

        await asyncio.gather(*(one(name) for name in names))
        deadline = time.perf_counter() + self.args.phase_timeout
        wanted = set(names)
        while time.perf_counter() < deadline:
            left = {o["metadata"]["name"] for o in await self.kube.list(SA_RES)} & wanted
            if not left:
                return
            await asyncio.sleep(0.5)
        self.notes.append(f"{phase}: {len(left)} ServiceAccounts not deleted in time")

    # --------------------------------------------------------------- 8. several servers

    async def servers(self, op: OperatorProcess) -> None:
        """One client per ZenML server (issue 13): a slow or hung server must not stall the
        ServiceAccounts of another. A second real ZenML server B, reached through a
        ZenMLServer `b` in the namespace; M ServiceAccounts on the default server (A) are
        created at once and timed until all are Ready: alone (the reference), beside M on B
        while B is healthy, and beside M on B while B hangs (SIGSTOP: connections accepted,
        never answered). B then resumes (SIGCONT) and its M are timed until Ready. All the
        phase created is deleted again (B answering), so the later phases see the same
        objects; B is resumed whatever happens, and stopped at the end."""
        from zenml_devstack.zenml_server import (
            create_service_account_with_key,
            start_zenml_server,
        )

        m = self.args.servers_n or min(self.n, 50)
        self.say(
            f"[servers] a second ZenML server B (ZenMLServer b): {m} ServiceAccounts on the"
            f" default server at once, alone, then beside {m} on B healthy, then beside {m} on"
            " B hung (SIGSTOP)"
        )
        t_start = time.perf_counter()
        server_b = await asyncio.to_thread(start_zenml_server, self.workdir / "zenml-b")
        t_server = time.perf_counter() - t_start
        created: list[str] = []  # the phase's ServiceAccounts, deleted at the end
        credentials = f"zenml-b-credentials-{self.tag}"
        cases: dict[str, dict[str, Any]] = {}
        try:
            key_b = await asyncio.to_thread(
                create_service_account_with_key,
                server_b.url,
                server_b.admin_password,
                OPERATOR_ACCOUNT,
            )
            server_b.grant_admin(OPERATOR_ACCOUNT)
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": credentials, "namespace": NS},
                "data": {"ZENML_STORE_API_KEY": base64.b64encode(key_b.encode()).decode()},
            }
            del key_b
            response = await self.http.post(SECRET_PATH, json=secret)
            response.raise_for_status()
            response = await self.http.post(
                ZS_PATH,
                json={
                    "apiVersion": "zenml.io/v1alpha1",
                    "kind": "ZenMLServer",
                    "metadata": {"name": "b", "namespace": NS},
                    "spec": {"url": server_b.url, "credentials": {"secretName": credentials}},
                },
            )
            response.raise_for_status()
            t0 = time.perf_counter()
            await self.kube.wait_for(ZS_RES, "b", server_logged_in, 120)
            self.detail(
                f"server B {server_b.url} (pid {server_b.process.pid}) started in"
                f" {t_server:.1f} s; ZenMLServer b LoggedIn {time.perf_counter() - t0:.1f} s"
                " after its create"
            )
            for label in ("alone", "healthy", "hung"):
                cases[label] = await self.servers_case(op, label, m, server_b, created)
            hung_b = [f"srv-b-hung-{self.tag}-{i}" for i in range(m)]
            await self.check_logins(hung_b[:: max(1, m // 3)][:3], "B after the hang", server_b.url)
        finally:
            server_b.resume()  # never leave it stopped (a no-op when it runs)
            try:
                t0 = time.perf_counter()
                if created:
                    await self.delete_all(created, "servers")
                response = await self.http.delete(f"{ZS_PATH}/b")
                if response.status_code != 404:
                    await self.kube.wait_for(ZS_RES, "b", lambda obj: obj is None, 120)
                await self.http.delete(f"{SECRET_PATH}/{credentials}")
                self.detail(
                    f"clean-up: {len(created)} ServiceAccounts and ZenMLServer b deleted in"
                    f" {time.perf_counter() - t0:.1f} s"
                )
            finally:
                await asyncio.to_thread(server_b.stop)
        self.servers_rows(m, cases, time.perf_counter() - t_start)

    async def servers_case(
        self,
        op: OperatorProcess,
        label: str,
        m: int,
        server_b: Any,
        created: list[str],
    ) -> dict[str, Any]:
        """One measurement of the servers phase: M ServiceAccounts on A created at once (and,
        unless `label` is alone, M on B created with them, interleaved); A's time until all
        are Ready. `hung`: B is stopped (SIGSTOP) from just before the creates until A's are
        all Ready; then B's Ready ones are counted, B resumed, and B's timed from there."""
        on_b, hang = label != "alone", label == "hung"
        timeout = min(self.args.phase_timeout, 600.0)
        a_names = [f"srv-a-{label}-{self.tag}-{i}" for i in range(m)]
        b_names = [f"srv-b-{label}-{self.tag}-{i}" for i in range(m)] if on_b else []
        a_set, b_set = set(a_names), set(b_names)
        bodies = []
        for i, name in enumerate(a_names):
            bodies.append(sa_body(name))
            if on_b:
                bodies.append(sa_body(b_names[i], server="b"))
        created += a_names + b_names

        def ready_in(names: set[str]) -> Callable[[dict[str, Any]], bool]:
            return lambda obj: (obj.get("metadata") or {}).get("name") in names and is_ready(obj)

        before = await op.stats()
        since = await self.kube.resource_version()
        a_pid, b_pid = self.server.process.pid, server_b.process.pid
        cpu0 = (_cpu_seconds(a_pid), _cpu_seconds(b_pid), self.kube.cpu())
        result: dict[str, Any] = {"m": m}
        watchers: list[asyncio.Task[tuple[float, int]]] = []
        b_times: list[float] = []
        try:
            if hang:
                server_b.pause()
            try:
                t0 = time.perf_counter()
                watchers.append(
                    asyncio.create_task(
                        self.watch_until(SA_PATH, since, ready_in(a_set), m, timeout)
                    )
                )
                if on_b:
                    watchers.append(
                        asyncio.create_task(
                            self.watch_until(
                                SA_PATH, since, ready_in(b_set), m, timeout, times=b_times
                            )
                        )
                    )
                await self.kube.create_all(SA_RES, bodies)
                t_created = time.perf_counter() - t0
                t_a, ready_a = await watchers[0]
                result.update(a_seconds=t_a - t0, a_ready=ready_a)
                delta = (await op.stats()).minus(before)
                server_cpu = (_cpu_seconds(a_pid) - cpu0[0], _cpu_seconds(b_pid) - cpu0[1])
                kube_cpu = self.kube_cpu(cpu0[2])
                if hang:
                    objs = [
                        obj
                        for obj in await self.kube.list(SA_RES)
                        if obj["metadata"]["name"] in b_set
                    ]
                    reasons = collections.Counter(
                        (ready_condition(obj) or {}).get("reason") or "(no condition yet)"
                        for obj in objs
                    )
                    result.update(
                        b_ready_while_hung=sum(is_ready(obj) for obj in objs),
                        b_reasons_while_hung=dict(reasons.most_common()),
                        hung_seconds=time.perf_counter() - t0,
                    )
            finally:
                if hang:
                    server_b.resume()
            t_from = time.perf_counter() if hang else t0
            if on_b:
                t_b, ready_b = await watchers[1]
                first = min(b_times, default=t_b)
                result.update(
                    b_seconds=max(0.0, t_b - t_from),
                    b_first_seconds=max(0.0, first - t_from),
                    b_ready=ready_b,
                )
        finally:
            for task in watchers:
                task.cancel()
        text = (
            f"{label}: {result['a_ready']}/{m} on A Ready in {result['a_seconds']:.1f} s (all"
            f" created after {t_created:.1f} s)"
        )
        if hang:
            reasons_text = ", ".join(f"{k} {v}" for k, v in result["b_reasons_while_hung"].items())
            text += (
                f"; B's while hung ({result['hung_seconds']:.1f} s):"
                f" {result['b_ready_while_hung']}/{m} Ready ({reasons_text}); after the"
                f" resume the first Ready in {result['b_first_seconds']:.1f} s,"
                f" {result['b_ready']}/{m} in {result['b_seconds']:.1f} s"
            )
        elif on_b:
            text += f"; B's {result['b_ready']}/{m} Ready in {result['b_seconds']:.1f} s"
        self.detail(
            f"{text}; CPU while A's converged: operator {delta.cpu:.1f} s, ZenML server A"
            f" {server_cpu[0]:.1f} s, B {server_cpu[1]:.1f} s, {kube_cpu}"
        )
        result.update(
            operator_cpu=delta.cpu, server_a_cpu=server_cpu[0], server_b_cpu=server_cpu[1]
        )
        return result

    def servers_rows(self, m: int, cases: Mapping[str, Mapping[str, Any]], took: float) -> None:
        alone, healthy, hung = (cases.get(k) or {} for k in ("alone", "healthy", "hung"))
        self.servers_result = {"m": m, "phase_seconds": took, **cases}
        if not (alone and healthy and hung):
            self.notes.append("servers: the phase did not complete (see the detail lines)")
            return
        from zenml_operator.config import OperatorConfig

        default = OperatorConfig(zenml_url="", zenml_api_key=str)
        a = self.args
        timeout = default.zenml_timeout if a.zenml_timeout is None else a.zenml_timeout
        retry = default.retry_delay if a.retry_delay is None else a.retry_delay
        t_hung, t_healthy, t_alone = hung["a_seconds"], healthy["a_seconds"], alone["a_seconds"]
        ratio = t_hung / t_healthy
        self.servers_result["ratio_hung_healthy"] = ratio
        self.servers_result["ratio_hung_alone"] = t_hung / t_alone
        all_a = all(c["a_ready"] == m for c in (alone, healthy, hung))
        vs_alone = t_hung / t_alone
        self.add_row(
            f"8. Servers: {m} ServiceAccounts on the default server at once → all Ready, beside"
            f" {m} on server B: B hung | B healthy",
            f"{t_hung:.1f} s (B hung)",
            f"{t_healthy:.1f} s (B healthy)",
            ratio,
            "≤ 1.2 (and vs A alone)",
            all_a and ratio <= 1.2 and vs_alone <= 1.2,
            f"A alone: {t_alone:.1f} s (B hung / A alone {vs_alone:.2f}); a healthy B also"
            " takes CPU of the same cores (its key creates), a hung one none",
        )
        b_hung = hung["b_ready_while_hung"]
        self.add_row(
            f"   Servers: B's {m} ServiceAccounts created while B hangs → Ready while hung /"
            " after the resume",
            f"{b_hung}/{m} while hung ({hung['hung_seconds']:.0f} s); {hung['b_ready']}/{m}"
            f" {hung['b_seconds']:.1f} s after the resume (first"
            f" {hung['b_first_seconds']:.1f} s)",
            f"{healthy['b_seconds']:.1f} s (B healthy: {healthy['b_ready']}/{m} from create)",
            None,
            "0 while hung; all after",
            b_hung == 0 and hung["b_ready"] == m and healthy["b_ready"] == m,
            "B stopped by SIGSTOP (connections accepted, never answered); operator ZenML"
            f" timeout {timeout:g} s, retry delay {retry:g} s (a hang longer than the timeout"
            f" leaves B's to wait out the retry delay after the resume); phase {took:.0f} s with"
            " B's start and the clean-up",
        )

    # --------------------------------------------------------------- 4. memory

    def memory_row(self) -> None:
        if not self.peak_rss:
            return
        peak = max(v for _, v in self.peak_rss)
        for what, value in self.peak_rss:
            self.detail(f"peak RSS, {what}: {value / MB:.0f} MB")
        # Targets: 150 MB at N=1000 (the first issue's), 250 MB at N=5000 (issue 14's).
        target_n, target_mb = (5000, 250) if self.n >= 5000 else (1000, 150)
        at_target = self.n >= target_n
        self.add_row(
            f"4. Memory: operator peak RSS at N={self.n}",
            f"{peak / MB:.0f} MB",
            "",
            None,
            f"≤ {target_mb} MB at N={target_n}",
            (peak <= target_mb * MB) if at_target else None,
            "VmHWM of the operator process"
            + ("" if at_target else "; the targets are for N=1000 (--large) and N=5000"),
        )

    # --------------------------------------------------------------- the report

    @property
    def skip(self) -> set[str]:
        return set(self.args.skip or ())

    def add_row(
        self,
        figure: str,
        operator: str,
        baseline: str,
        ratio: float | None,
        target: str,
        met: bool | None,
        note: str,
    ) -> None:
        self.rows.append(
            {
                "figure": figure,
                "operator": operator,
                "baseline": baseline,
                "ratio": "" if ratio is None else f"{ratio:.2f}",
                "target": target,
                "met": "" if met is None else ("yes" if met else "NO"),
                "note": note,
            }
        )

    def report(self) -> None:
        columns = [
            ("figure", "figure"),
            ("operator", "operator"),
            ("baseline", "baseline"),
            ("ratio", "ratio"),
            ("target", "target"),
            ("met", "met"),
        ]
        widths = {
            key: max(len(title), *(len(r[key]) for r in self.rows)) if self.rows else len(title)
            for key, title in columns
        }
        self.say("")
        self.say(f"Results (N={self.n}, {self.elapsed:.0f} s in all)")
        header = "  ".join(title.ljust(widths[key]) for key, title in columns)
        self.say(header)
        self.say("-" * len(header))
        for row in self.rows:
            self.say("  ".join(row[key].ljust(widths[key]) for key, _ in columns))
            if row["note"]:
                self.say(" " * 4 + f"({row['note']})")
        self.say("")
        self.say("Machine: " + "; ".join(f"{k} {v}" for k, v in self.machine.items()))
        self.say(f"Load average: {self.load_start} at start, {self.load_end} at the end")
        self.say(f"Kubernetes: {self.kube.description}")
        for note in self.notes:
            self.say(f"NOTE: {note}")
        for note, times in collections.Counter(self.kube.watch_notes).items():
            self.say(f"NOTE (watch): {note}" + (f" (x{times})" if times > 1 else ""))
        knobs = self.knobs()
        self.say(f"Operator settings: {knobs}")
        self.say("")
        self.say("Markdown:")
        self.say("")
        self.say(
            f"Measured with `tests/bench/benchmark.py --n {self.n} --kube {self.kube.mode}` on "
            f"{self.machine['CPU']}, {self.machine['cores']} cores, {self.machine['RAM']} RAM, "
            f"Python {self.machine['Python']}; real ZenML 0.98.0 server (sqlite) and the "
            f"operator on the same machine, {self.kube.description}; load average "
            f"{self.load_start} at start."
        )
        self.say("")
        self.say("| figure | operator | baseline | ratio | target | met | baseline / note |")
        self.say("|---|---|---|---|---|---|---|")
        for r in self.rows:
            cells = [r["figure"].strip(), r["operator"], r["baseline"], r["ratio"]]
            cells += [r["target"], r["met"], r["note"]]
            self.say("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        self.say("")
        self.say(f"Operator settings: {knobs}.")
        if self.args.json:
            Path(self.args.json).write_text(
                json.dumps(
                    {
                        "n": self.n,
                        "machine": self.machine,
                        "rows": self.rows,
                        "details": self.details,
                        "notes": self.notes,
                        "watch_notes": self.kube.watch_notes,
                        "load": [self.load_start, self.load_end],
                        "settings": knobs,
                        "kube": self.kube.description,
                        "servers": getattr(self, "servers_result", None),
                    },
                    indent=2,
                )
            )

    def knobs(self) -> str:
        from zenml_operator.config import OperatorConfig

        a, default = self.args, OperatorConfig(zenml_url="", zenml_api_key=str)

        def given(value: Any, fallback: Any) -> Any:
            return fallback if value is None else value

        return (
            f"ZenML requests in flight {self.operator_limit()} (of which key creates/rotations/"
            f"logins {given(a.heavy_concurrency, default.zenml_heavy_concurrency)}), ZenML "
            f"timeout {given(a.zenml_timeout, default.zenml_timeout):g} s, retry delay "
            f"{given(a.retry_delay, default.retry_delay):g} s, background rate "
            f"{self.background_rate():g}/s, reconciles at once "
            f"{default.max_concurrent_reconciles}, Kopf queueing.worker_limit "
            f"{a.worker_limit}, posting.worker_limit {given(a.posting_worker_limit, 8)}; "
            f"resync {MAIN_RESYNC:g} s in the create/rotate phases, 600 s at the restart"
            + (f", {self.idle_resync:g} s in the idle phase" if self.idle_resync else "")
        )


# ================================================================== command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=200, help="objects for throughput/rotation/idle")
    p.add_argument("--large", action="store_true", help="N=1000 (the memory target's size)")
    p.add_argument("--runs", type=int, default=20, help="latency runs per side")
    p.add_argument("--cli-runs", type=int, default=10, help="timed runs of the zenml CLI")
    p.add_argument(
        "--resync",
        type=float,
        default=None,
        help="resync interval of the idle phase (default: 5 s, longer when the ZenML server"
        " could not serve one resync of every object in half of it)",
    )
    p.add_argument("--idle-intervals", type=int, default=2, help="resync intervals measured")
    p.add_argument(
        "--skip",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help="comma list of: latency, cli, rotation, repair, servers, restart, idle, loop (the"
        " REST-loop baselines of throughput and rotation: halves the set-up of a memory/idle"
        " run)",
    )
    p.add_argument(
        "--servers-n",
        type=int,
        default=None,
        help="servers phase: ServiceAccounts per server and case (default min(N, 50))",
    )
    p.add_argument(
        "--background-rate",
        type=float,
        default=None,
        help="operator's ZENML_OPERATOR_BACKGROUND_RATE (default: the operator's, 20/s)",
    )
    p.add_argument(
        "--repair-samples",
        type=int,
        default=5,
        help="repair phase: damages timed per kind, idle and busy (--skip repair: no phase)",
    )
    p.add_argument("--max-connections", type=int, default=None, help="operator's ZenML pool")
    p.add_argument(
        "--heavy-concurrency",
        type=int,
        default=None,
        help="operator's key creates/rotations/logins in flight",
    )
    p.add_argument("--zenml-timeout", type=float, default=None, help="operator's ZenML timeout")
    p.add_argument("--retry-delay", type=float, default=None, help="operator's retry delay")
    p.add_argument("--worker-limit", type=int, default=None, help="Kopf queueing.worker_limit")
    p.add_argument(
        "--posting-worker-limit", type=int, default=None, help="Kopf posting.worker_limit"
    )
    p.add_argument(
        "--kube",
        choices=("auto", "real", "emulated"),
        default="auto",
        help="Kubernetes API: a real etcd + kube-apiserver started from KUBEBUILDER_ASSETS"
        " (tests/control_plane.py), the in-process emulator, or real when the binaries are"
        " there",
    )
    p.add_argument(
        "--controller-manager",
        action="store_true",
        help="with a real control plane, also run kube-controller-manager (garbage collector"
        " and the other controllers; the benchmark needs none of them)",
    )
    p.add_argument("--phase-timeout", type=float, default=1800.0, help="give up a phase after")
    p.add_argument(
        "--profile",
        action="store_true",
        help="run the operator under py-spy (pip install py-spy); summaries at the end",
    )
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace the main operator's Python allocations (slow); top lines in the work dir",
    )
    p.add_argument("--workdir", default=None, help="keep data here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp work dir")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    return p


def summarise_pyspy(path: Path, top: int = 25) -> list[str]:
    """Self and inclusive time per function from py-spy's raw (collapsed) output."""
    if not path.exists():
        return [f"(no profile at {path})"]
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        # "func (path/to/module.py:123)" -> "func (module.py)": whole functions, short paths.
        names = [re.sub(r"\(([^)]*/)?([^/:)]+)(:[0-9]+)?\)", r"(\2)", f) for f in frames]
        own[names[-1]] += count
        for name in set(names):
            incl[name] += count
    lines = [f"{total} samples (active only)"]
    lines.append("self:")
    lines += [f"  {v / total * 100:5.1f}%  {k}" for k, v in own.most_common(top)]
    lines.append("inclusive (frames under 90%, i.e. below the event loop):")
    chosen = [(k, v) for k, v in incl.most_common() if v < 0.9 * total]
    lines += [f"  {v / total * 100:5.1f}%  {k}" for k, v in chosen[:top]]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_runner"]:
        return runner_main()
    args = parser().parse_args(argv)
    if args.large:
        args.n = max(args.n, 1000)
    bench = Bench(args)
    code = asyncio.run(bench.run())
    if args.profile:
        for label in ("main", "idle"):
            print(f"\npy-spy profile of the operator, phase group {label!r}:")
            for line in summarise_pyspy(bench.workdir / f"operator-{label}.pyspy.txt"):
                print(line)
        print(f"(raw profiles in {bench.workdir})")
    return code


if __name__ == "__main__":
    sys.exit(main())
