"""Pydantic models of the custom resources' specs and statuses.

They are the single source of truth: `crdgen` turns them into the CRDs in `crds/`
(a test fails when the two drift), and the handlers parse specs with them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "zenml.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

ObjectRef = tuple[str, str, str]  # (namespace, name, uid): one custom resource, as scheduled

# DNS-1123 label: what Kubernetes accepts as a name segment; also safe as a ZenML name.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# DNS-1123 subdomain: what Kubernetes accepts as a Secret name.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A Secret data key: alphanumerics, '-', '_' or '.'.
SECRET_DATA_KEY = r"^[-._a-zA-Z0-9]+$"
# A label or annotation key: an optional DNS-subdomain prefix (at most 253 characters) and
# a name of at most 63 characters (Kubernetes' "qualified name").
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# A label value: at most 63 characters, alphanumeric at both ends.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
MAX_DESCRIPTION = 1024
# An http(s) URL: scheme, a host (with an optional port), an optional path; no query or fragment.
HTTP_URL = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"
MAX_URL = 2048
MAX_CA_BUNDLE = 65536
PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"

# Kinds a ServiceAccount's spec.serverRef may name, and the plurals of the server resources.
SERVER_KINDS = ("ZenMLServer", "ClusterZenMLServer")
ZENML_SERVERS = "zenmlservers"
CLUSTER_ZENML_SERVERS = "clusterzenmlservers"


def cel(rule: str, message: str, *, reason: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule, "message": message}
    if reason:
        entry["reason"] = reason
    return entry


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are an error."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class SecretKeys(_Model):
    """Names of the data keys in the generated Secret."""

    url: Annotated[
        str,
        Field(
            description="Data key that holds the ZenML server URL.",
            pattern=SECRET_DATA_KEY,
            max_length=253,
        ),
    ] = "ZENML_STORE_URL"
    api_key: Annotated[
        str,
        Field(
            description="Data key that holds the API key value.",
            pattern=SECRET_DATA_KEY,
            max_length=253,
        ),
    ] = "ZENML_STORE_API_KEY"
    pro_api_url: Annotated[
        str,
        Field(
            description=(
                "Data key that holds the ZenML Pro API URL (written only when the server"
                " sets proApiUrl)."
            ),
            pattern=SECRET_DATA_KEY,
            max_length=253,
        ),
    ] = "ZENML_PRO_API_URL"
    verify_ssl: Annotated[
        str,
        Field(
            description=(
                "Data key that holds the server's CA bundle (PEM), which the zenml client"
                " trusts (written only when the server sets caBundle)."
            ),
            pattern=SECRET_DATA_KEY,
            max_length=253,
        ),
    ] = "ZENML_STORE_VERIFY_SSL"

    @model_validator(mode="after")
    def _keys_differ(self) -> SecretKeys:
        # The CRD's CEL rule, repeated for where no API server checks it: two values under
        # one data key would overwrite each other in the Secret.
        names = [self.url, self.api_key, self.pro_api_url, self.verify_ssl]
        if len(set(names)) != len(names):
            raise ValueError("keys.url, keys.apiKey, keys.proApiUrl and keys.verifySsl must differ")
        return self


def _qualified_keys_rule(what: str) -> dict[str, str]:
    # The size bound keeps the rule's estimated cost within the API server's budget (map keys
    # have no maxLength of their own); the operator checks the exact prefix length too.
    pattern = QUALIFIED_NAME.replace("\\", "\\\\")
    return cel(
        f"self.all(k, k.size() <= 317 && k.matches('{pattern}'))",
        f"{what} keys must be qualified names ([prefix/]name, name at most 63 characters)",
    )


def check_qualified_names(keys: Iterable[str], what: str) -> None:
    """Raise ValueError naming the first key Kubernetes would refuse (not the values)."""
    for key in keys:
        prefix, _, name = key.rpartition("/")
        if not re.match(QUALIFIED_NAME, key) or len(prefix) > 253 or len(name) > 63:
            raise ValueError(f"{what} key {key!r} is not a valid qualified name")


LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]


class SecretTemplate(_Model):
    """Extra metadata and key names for the Secret that receives an API key."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    # Pairwise: cheap for the API server's cost estimate.
                    "self.keys.url != self.keys.apiKey"
                    " && self.keys.url != self.keys.proApiUrl"
                    " && self.keys.url != self.keys.verifySsl"
                    " && self.keys.apiKey != self.keys.proApiUrl"
                    " && self.keys.apiKey != self.keys.verifySsl"
                    " && self.keys.proApiUrl != self.keys.verifySsl",
                    "keys.url, keys.apiKey, keys.proApiUrl and keys.verifySsl must differ",
                )
            ]
        }
    )

    labels: Annotated[
        dict[str, LabelValue],
        Field(
            description="Labels added to the Secret (the operator's own labels win).",
            max_length=64,
            json_schema_extra={"x-kubernetes-validations": [_qualified_keys_rule("labels")]},
        ),
    ] = {}
    annotations: Annotated[
        dict[str, str],
        Field(
            description="Annotations added to the Secret (the operator's own win).",
            max_length=64,
            json_schema_extra={"x-kubernetes-validations": [_qualified_keys_rule("annotations")]},
        ),
    ] = {}
    keys: Annotated[
        SecretKeys,
        Field(description="Renames the Secret's data keys, e.g. for a non-ZenML client."),
    ] = SecretKeys()

    @field_validator("labels", "annotations")
    @classmethod
    def _keys_are_qualified_names(cls, value: dict[str, str], info: ValidationInfo) -> dict:
        check_qualified_names(value, info.field_name or "")
        return value


class ApiKeySpec(_Model):
    """One API key of the service account, delivered in its own Secret."""

    name: Annotated[
        str,
        Field(
            description="Key name in ZenML, unique within the service account.",
            pattern=DNS_LABEL,
            min_length=1,
            max_length=63,
        ),
    ]
    description: Annotated[
        str, Field(description="Key description in ZenML.", max_length=MAX_DESCRIPTION)
    ] = ""
    active: Annotated[
        bool,
        Field(description="false deactivates the key in ZenML (the Secret is kept)."),
    ] = True
    secret_name: Annotated[
        str | None,
        Field(
            description=(
                "Name of the Secret, in the resource's namespace, that receives the key."
                " Default: <metadata.name>-<key name>."
            ),
            pattern=DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    secret_template: Annotated[
        SecretTemplate,
        Field(description="Labels, annotations and data key names of the Secret."),
    ] = SecretTemplate()

    def secret_name_for(self, resource_name: str) -> str:
        return self.secret_name or f"{resource_name}-{self.name}"


DeletionPolicy = Literal["Delete", "Deactivate", "Retain"]


SERVER_REF_NAMESPACE_MESSAGE = (
    "serverRef.namespace is not allowed: a ZenMLServer can only be used from its own"
    " namespace; use a ClusterZenMLServer to share a server across namespaces"
)
NAMESPACED_CREDENTIALS_MESSAGE = (
    "credentials.namespace is only for a ClusterZenMLServer: a ZenMLServer reads its Secret"
    " from its own namespace"
)
CLUSTER_CREDENTIALS_MESSAGE = (
    "a ClusterZenMLServer must name the namespace of its credentials Secret"
)
CA_BUNDLE_MESSAGE = f"caBundle must be PEM: it contains no '{PEM_CERTIFICATE}'"


class ServerRef(_Model):
    """The ZenMLServer or ClusterZenMLServer a ServiceAccount lives on."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [cel("!has(self.namespace)", SERVER_REF_NAMESPACE_MESSAGE)]
        }
    )

    kind: Annotated[
        Literal["ZenMLServer", "ClusterZenMLServer"],
        Field(
            description=("ZenMLServer (in this namespace) or ClusterZenMLServer (cluster-scoped).")
        ),
    ]
    name: Annotated[
        str,
        Field(
            description="Name of the server resource.",
            pattern=DNS_SUBDOMAIN,
            min_length=1,
            max_length=253,
        ),
    ]
    namespace: Annotated[
        str | None,
        Field(
            description=(
                "Not allowed: a ZenMLServer is only usable from its own namespace (the"
                " field exists to give a clear error)."
            ),
            pattern=DNS_LABEL,
            max_length=63,
        ),
    ] = None

    @model_validator(mode="after")
    def _no_namespace(self) -> ServerRef:
        # Repeated from the CRD's CEL rule for where no API server checks it.
        if self.namespace is not None:
            raise ValueError(SERVER_REF_NAMESPACE_MESSAGE)
        return self


class ServiceAccountSpec(_Model):
    """A ZenML service account and its API keys."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.name) == has(oldSelf.name)"
                    " && (!has(self.name) || self.name == oldSelf.name)",
                    "spec.name is immutable: create a new resource for another account",
                    reason="FieldValueForbidden",
                ),
                cel(
                    "has(self.serverRef) == has(oldSelf.serverRef)"
                    " && (!has(self.serverRef) || self.serverRef == oldSelf.serverRef)",
                    "spec.serverRef is immutable: create a new ServiceAccount for another server",
                    reason="FieldValueForbidden",
                ),
            ]
        }
    )

    name: Annotated[
        str | None,
        Field(
            description="Service account name in ZenML (immutable). Default: metadata.name.",
            pattern=DNS_LABEL,
            min_length=1,
            max_length=63,
        ),
    ] = None
    server_ref: Annotated[
        ServerRef | None,
        Field(
            description=(
                "The ZenML server this account lives on (immutable). Absent: the operator's"
                " default server, from its environment."
            )
        ),
    ] = None
    description: Annotated[
        str, Field(description="Service account description in ZenML.", max_length=MAX_DESCRIPTION)
    ] = ""
    active: Annotated[
        bool,
        Field(description="false deactivates the account, which disables all of its keys."),
    ] = True
    deletion_policy: Annotated[
        DeletionPolicy,
        Field(
            description=(
                "What happens in ZenML when this resource is deleted: Delete the account"
                " (falls back to Deactivate when it owns ZenML resources), Deactivate it,"
                " or Retain it untouched."
            )
        ),
    ] = "Delete"
    adopt: Annotated[
        bool,
        Field(
            description=(
                "Take over an existing ZenML account of this name. When false, a name"
                " already used by an account this resource did not create is an error."
            )
        ),
    ] = False
    api_keys: Annotated[
        list[ApiKeySpec],
        Field(
            description="API keys of the account; each is written into its own Secret.",
            max_length=32,
            json_schema_extra={
                # Unique names are enforced by the API server itself (a list-map keyed by
                # name, which also lets server-side apply merge keys one by one).
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "x-kubernetes-validations": [
                    cel(
                        # Ternaries, not `||`/`&&`: cel-python (the tests' evaluator) does not
                        # absorb the error of a missing field the way Kubernetes' CEL does.
                        "self.all(k, has(k.secretName) ? self.exists_one(o,"
                        " has(o.secretName) ? o.secretName == k.secretName : false) : true)",
                        "apiKeys[].secretName must be unique",
                    ),
                ],
            },
        ),
    ] = []

    def account_name_for(self, resource_name: str) -> str:
        return self.name or resource_name


class Condition(_Model):
    """A Kubernetes-convention condition (as in metav1.Condition)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


# Merged by type, as metav1.Condition lists are (server-side apply and kubectl).
Conditions = Annotated[
    list[Condition],
    Field(
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    ),
]


class ApiKeyStatus(_Model):
    """What the operator knows about one declared key."""

    name: str
    id: str | None = None
    active: bool | None = None
    secret_name: str | None = None
    # When the value now in the Secret was issued by ZenML (create or rotate).
    issued_at: str | None = None
    state: Annotated[str, Field(description="Ready, SecretConflict, Pending or Deactivated.")] = (
        "Pending"
    )


class ServiceAccountStatus(_Model):
    """Observed state of a ServiceAccount."""

    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = None
    zenml_url: str | None = None
    account_id: str | None = None
    account_name: str | None = None
    active: bool | None = None
    # Set right before the operator asks ZenML to create the account: after a crash, an
    # account of that name created since then is known to be ours, not a NameConflict.
    create_requested_at: str | None = None
    ready_keys: int | None = None
    api_keys: list[ApiKeyStatus] = []
    conditions: Conditions = []


class ServerCredentials(_Model):
    """The Secret the operator logs in to the ZenML server with.

    The Secret holds either ZENML_STORE_API_KEY (an API key of a service account) or
    ZENML_STORE_USERNAME and ZENML_STORE_PASSWORD.
    """

    secret_name: Annotated[
        str,
        Field(
            description=(
                "Name of the Secret holding ZENML_STORE_API_KEY (a service account's API key)"
                " or ZENML_STORE_USERNAME and ZENML_STORE_PASSWORD."
            ),
            pattern=DNS_SUBDOMAIN,
            min_length=1,
            max_length=253,
        ),
    ]
    namespace: Annotated[
        str | None,
        Field(
            description=(
                "Namespace of the Secret: required for a ClusterZenMLServer (the operator's"
                " namespace unless the chart allows others), not allowed for a ZenMLServer"
                " (its Secret is in its own namespace)."
            ),
            pattern=DNS_LABEL,
            min_length=1,
            max_length=63,
        ),
    ] = None


_URL_FIELD = {"pattern": HTTP_URL, "max_length": MAX_URL}


class _ServerSpecBase(_Model):
    """Fields shared by ZenMLServer and ClusterZenMLServer; only their rules differ."""

    url: Annotated[
        str,
        Field(
            description="URL of the ZenML server the operator talks to, e.g. https://zenml.example.com.",
            **_URL_FIELD,
        ),
    ]
    secret_url: Annotated[
        str | None,
        Field(
            description=(
                "URL written into Secrets when pods reach ZenML by another address. Default: url."
            ),
            **_URL_FIELD,
        ),
    ] = None
    pro_api_url: Annotated[
        str | None,
        Field(
            description=(
                "ZenML Pro API URL (e.g. https://cloudapi.zenml.io), written into every"
                " Secret of this server as ZENML_PRO_API_URL."
            ),
            **_URL_FIELD,
        ),
    ] = None
    ca_bundle: Annotated[
        str | None,
        Field(
            description=(
                "PEM certificates of the CA that signed the server's certificate: the"
                " operator trusts them, and Secrets carry them as ZENML_STORE_VERIFY_SSL."
            ),
            max_length=MAX_CA_BUNDLE,
            json_schema_extra={
                "x-kubernetes-validations": [
                    cel(f"self.contains('{PEM_CERTIFICATE}')", CA_BUNDLE_MESSAGE)
                ]
            },
        ),
    ] = None
    credentials: Annotated[
        ServerCredentials,
        Field(description="The Secret the operator logs in with."),
    ]

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle_is_pem(cls, value: str | None) -> str | None:
        if value is not None and PEM_CERTIFICATE not in value:
            raise ValueError(CA_BUNDLE_MESSAGE)
        return value

    def url_for_secrets(self) -> str:
        return self.secret_url or self.url


class ZenMLServerSpec(_ServerSpecBase):
    """A ZenML server, usable by ServiceAccounts of this namespace."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.credentials.namespace)", NAMESPACED_CREDENTIALS_MESSAGE)
            ]
        }
    )

    @model_validator(mode="after")
    def _credentials_in_own_namespace(self) -> ZenMLServerSpec:
        if self.credentials.namespace is not None:
            raise ValueError(NAMESPACED_CREDENTIALS_MESSAGE)
        return self


class ClusterZenMLServerSpec(_ServerSpecBase):
    """A ZenML server, usable by ServiceAccounts of every namespace."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.credentials.namespace)", CLUSTER_CREDENTIALS_MESSAGE)
            ]
        }
    )

    @model_validator(mode="after")
    def _credentials_namespace_named(self) -> ClusterZenMLServerSpec:
        if self.credentials.namespace is None:
            raise ValueError(CLUSTER_CREDENTIALS_MESSAGE)
        return self


class ZenMLServerStatus(_Model):
    """Observed state of a ZenMLServer or ClusterZenMLServer."""

    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = None
    url: str | None = None
    # The ZenML account the operator logged in as.
    identity: str | None = None
    server_id: str | None = None
    server_version: str | None = None
    deployment_type: str | None = None
    conditions: Conditions = []


# Go-style duration as Kubernetes CEL's duration() parses it; hours, minutes, seconds.
DURATION = r"^([0-9]{1,6}(\.[0-9]+)?(h|m|s))+$"
_DURATION_CEL = DURATION.replace("\\", "\\\\")  # inside a CEL string literal
ROTATE_ANNOTATION = "zenml.io/rotate"


class WorkloadRef(_Model):
    """A workload that reads the key's Secret and is restarted after each rotation."""

    kind: Annotated[
        Literal["Deployment", "StatefulSet", "DaemonSet"],
        Field(description="Deployment, StatefulSet or DaemonSet (apps/v1)."),
    ]
    name: Annotated[
        str,
        Field(
            description="Name, in the rotation's namespace.",
            pattern=DNS_SUBDOMAIN,
            min_length=1,
            max_length=253,
        ),
    ]


class ApiKeyRotationSpec(_Model):
    """Rotates one API key of a ServiceAccount in the same namespace."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    # Integer arithmetic, not duration(string(...)): a string built at run time
                    # has no size bound, and the API server refuses the rule's estimated cost.
                    # Each duration rule is guarded by the pattern: a malformed period is then
                    # refused by the pattern alone, not by an evaluation error of duration().
                    f"self.period.matches('{_DURATION_CEL}')"
                    " ? duration(self.period).getSeconds() > self.retainPeriodMinutes * 60"
                    " : true",
                    "period must be longer than retainPeriodMinutes: ZenML keeps one previous"
                    " key, so a rotation inside the retention window would cut off the key"
                    " that workloads still hold",
                ),
                cel(
                    f"self.period.matches('{_DURATION_CEL}')"
                    " ? duration(self.period) >= duration('5m') : true",
                    "period must be at least 5m",
                ),
                cel(
                    f"self.period.matches('{_DURATION_CEL}')"
                    " ? duration(self.period) <= duration('87600h') : true",
                    "period must be at most 87600h (10 years)",
                ),
            ]
        }
    )

    service_account_name: Annotated[
        str,
        Field(
            description="Name of the ServiceAccount resource (zenml.io) in this namespace.",
            pattern=DNS_SUBDOMAIN,
            min_length=1,
            max_length=253,
        ),
    ]
    api_key_name: Annotated[
        str,
        Field(
            description="Name of the key in that ServiceAccount's spec.apiKeys.",
            pattern=DNS_LABEL,
            min_length=1,
            max_length=63,
        ),
    ]
    period: Annotated[
        str,
        Field(
            description="Time between rotations, e.g. 720h or 90m (hours, minutes, seconds).",
            pattern=DURATION,
            max_length=32,
        ),
    ] = "720h"
    retain_period_minutes: Annotated[
        int,
        Field(
            description=(
                "Minutes the previous key keeps working after a rotation, so that restarted"
                " workloads can roll out; then it is deleted and gets 401. Must cover the rollout."
            ),
            ge=0,
            le=525600,
        ),
    ] = 60
    rollout_restart_targets: Annotated[
        list[WorkloadRef],
        Field(
            description="Workloads restarted once after each rotation (as kubectl rollout"
            " restart does).",
            max_length=32,
        ),
    ] = []
    suspend: Annotated[
        bool,
        Field(description="true pauses scheduled and on-demand rotations."),
    ] = False


class ApiKeyRotationStatus(_Model):
    """Observed state of an ApiKeyRotation."""

    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = None
    current_key_id: str | None = None
    previous_key_id: str | None = None
    last_rotation_time: str | None = None
    next_rotation_time: str | None = None
    previous_key_valid_until: str | None = None
    rotation_count: int | None = None
    # The value of the zenml.io/rotate annotation that was last acted on (fires once).
    last_rotate_request: str | None = None
    # The key id the restart targets were last restarted for (each restart happens once).
    restarted_for_key_id: str | None = None
    conditions: Conditions = []


def dump(model: BaseModel) -> dict[str, Any]:
    """The wire form of a model (camelCase, no nulls)."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")
