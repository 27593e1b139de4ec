"""`zenml-operator` command line: run (real cluster), crds. The local demo is `make demo`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
from pathlib import Path

import kopf


def _run(args: argparse.Namespace) -> int:
    from zenml_operator.config import config_from_env
    from zenml_operator.main import build_registry
    from zenml_operator.metrics import Metrics

    namespaces = tuple(args.namespace or ())
    if not namespaces and not args.all_namespaces:
        print(
            "zenml-operator run: give --namespace NS (repeatable) or --all-namespaces",
            file=sys.stderr,
        )
        return 2
    try:
        config = config_from_env(namespaces)
    except ValueError as exc:
        print(f"zenml-operator run: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port and args.metrics_port == args.liveness_port:
        print("zenml-operator run: --metrics-port and --liveness-port must differ", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    # One line per ZenML/Kubernetes request at INFO would drown the operator's own logs.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    metrics = Metrics()
    registry = build_registry(config, metrics=metrics)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None

    async def run() -> None:
        if args.metrics_port:
            # Up before Kopf starts: /readyz answers 503 "starting" until the startup is done.
            await metrics.serve(args.metrics_port)
            logging.info(f"Serving /metrics and /readyz on port {args.metrics_port}")
        try:
            await kopf.operator(
                registry=registry,
                namespaces=list(namespaces),
                clusterwide=args.all_namespaces,
                liveness_endpoint=liveness,
                standalone=not args.peering,
                peering_name=args.peering or None,
                # Equal priorities make Kopf pause every replica; a random one elects a
                # leader, and the others stand by until it stops.
                priority=random.randint(1, 1_000_000) if args.peering else 0,
            )
        finally:
            await metrics.aclose()

    asyncio.run(run())
    return 0


DEMO_MOVED = (
    "zenml-operator demo: the demo is not part of the installed operator. Run it from a"
    " checkout of zenml-operator: `make demo` (options: make demo"
    ' DEMO_ARGS="--keep-running -v").'
)


def _crds(args: argparse.Namespace) -> int:
    from zenml_operator.crdgen import write_crds

    for path in write_crds(Path(args.output)):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zenml-operator", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator against a Kubernetes cluster")
    run.add_argument("-n", "--namespace", action="append", help="namespace to watch (repeatable)")
    run.add_argument("-A", "--all-namespaces", action="store_true")
    run.add_argument(
        "--liveness-port", type=int, default=8080, help="serve /healthz on this port (0: off)"
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="serve /metrics (Prometheus) and /readyz on this port (0: off)",
    )
    run.add_argument(
        "--peering", default="", help="Kopf peering object name for HA (default: standalone)"
    )
    run.add_argument("--log-format", default="plain", choices=["plain", "full", "json"])
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)

    # Listed only to point old habits at the checkout's `make demo` (see `main`).
    sub.add_parser("demo", help="moved: run `make demo` in a checkout")

    crds = sub.add_parser("crds", help="write the CRDs generated from the models")
    crds.add_argument("--output", default="crds")
    crds.set_defaults(func=_crds)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # whatever its options: they belong to `make demo` now
        print(DEMO_MOVED, file=sys.stderr)
        return 2
    args = parser().parse_args(argv)
    if args.command != "run":  # `run` logs through kopf.configure (a second handler doubles lines)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
