"""`zenml-operator demo` without its ZenML start-up: examples/ against the session server.

`run_examples` is the demo minus starting ZenML (the session's real server is passed in):
the emulated API and the operator start, every document of examples/ is applied or skipped
for a stated reason, and the checks of the demo run, including the real zenml client
(~4-5 s, cheap enough to keep here).
"""

from __future__ import annotations

import re
from pathlib import Path

from zenml_devstack.demo import (
    Manifest,
    find_repo_root,
    load_examples,
    mask,
    run_examples,
    skip_reason,
)
from zenml_devstack.zenml_server import find_zenml_python
from zenml_operator.models import ServiceAccountSpec

ROOT = find_repo_root()


def example_service_accounts() -> list[Manifest]:
    """The examples' ServiceAccounts on the default server (the demo runs one ZenML server;
    those naming a server of their own in spec.serverRef are skipped with a reason)."""
    return [
        m
        for m in load_examples(ROOT / "examples")
        if m.kind == "ServiceAccount" and "serverRef" not in (m.doc.get("spec") or {})
    ]


async def test_every_example_becomes_ready_and_every_secret_logs_in(
    zenml_server, operator_api_key
) -> None:
    lines: list[str] = []
    report = await run_examples(
        zenml_url=zenml_server.url,
        operator_api_key=operator_api_key,
        root=ROOT,
        say=lines.append,
        zenml_python=find_zenml_python(),
    )
    output = "\n".join(lines)
    failed = [c for c in report.checks if not c.ok]
    assert report.ok, f"failed checks: {failed}\n{output}"

    accounts = example_service_accounts()
    assert accounts, "examples/ declares no ServiceAccount"
    expected_logins = {}
    for manifest in accounts:
        assert report.ready[manifest.ref()] == ("True", "Reconciled"), output
        spec = ServiceAccountSpec.model_validate(manifest.doc["spec"])
        for key in spec.api_keys:
            ref = f"{manifest.namespace or 'default'}/{key.secret_name_for(manifest.name)}"
            expected_logins[ref] = spec.account_name_for(manifest.name)
    assert report.logins == expected_logins
    assert report.real_client_user == "ml-pipelines"
    # The placeholder credential is skipped with a reason, never applied.
    assert re.search(r"skipped .*zenml-operator-credentials .*placeholder", output), output
    # No key value in the output: only the masked form.
    assert re.search(r"ZENKEY_(?!\*{4})", output) is None, output


def test_documents_the_demo_cannot_use_are_skipped_with_a_reason() -> None:
    served = {("v1", "Secret"): object(), ("zenml.io/v1alpha1", "ServiceAccount"): object()}
    rotation = Manifest(
        Path("r.yaml"), {"apiVersion": "zenml.io/v1alpha1", "kind": "ApiKeyRotation"}
    )
    placeholder = Manifest(
        Path("s.yaml"),
        {"apiVersion": "v1", "kind": "Secret", "stringData": {"K": "ZENKEY_replace-me"}},
    )
    real = Manifest(Path("t.yaml"), {"apiVersion": "v1", "kind": "Secret", "data": {"K": "eA=="}})
    assert "not served" in (skip_reason(rotation, served) or "")
    assert "placeholder" in (skip_reason(placeholder, served) or "")
    assert skip_reason(real, served) is None
    server = Manifest(
        Path("z.yaml"), {"apiVersion": "zenml.io/v1alpha1", "kind": "ClusterZenMLServer"}
    )
    on_server = Manifest(
        Path("u.yaml"),
        {
            "apiVersion": "zenml.io/v1alpha1",
            "kind": "ServiceAccount",
            "spec": {"serverRef": {"kind": "ClusterZenMLServer", "name": "prod"}},
        },
    )
    served[("zenml.io/v1alpha1", "ClusterZenMLServer")] = object()
    assert "ZenML server of its own" in (skip_reason(server, served) or "")
    assert "serverRef" in (skip_reason(on_server, served) or "")


def test_mask_never_shows_the_value() -> None:
    value = "ZENKEY_" + "a" * 40
    assert mask(value) == "ZENKEY_**** (47 chars)"
    assert value[8:] not in mask(value)
