{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "zenml-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, unless it already contains the chart name. */}}
{{- define "zenml-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "zenml-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "zenml-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zenml-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "zenml-operator.labels" -}}
helm.sh/chart: {{ include "zenml-operator.chart" . }}
{{ include "zenml-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "zenml-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "zenml-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* True ("true") when the operator runs as several replicas coordinated by Kopf peering. */}}
{{- define "zenml-operator.peering" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{- define "zenml-operator.peeringName" -}}
{{- default (include "zenml-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{/* Checks the combinations that the values schema cannot express well; fails the render. */}}
{{- define "zenml-operator.validate" -}}
{{- if not .Values.zenml.url }}
{{- fail "zenml.url is required: the ZenML server URL (http:// or https://)" }}
{{- end }}
{{- if not .Values.zenml.existingSecret.name }}
{{- fail "zenml.existingSecret.name is required: a Secret in the release namespace holding the operator's ZenML credential" }}
{{- end }}
{{- if and (eq .Values.rbac.scope "namespaced") (empty .Values.watchNamespaces) }}
{{- fail "rbac.scope=namespaced needs watchNamespaces: Roles cannot grant access to all namespaces" }}
{{- end }}
{{- if and .Values.defaultServer.create (not (or .Values.defaultServer.url .Values.zenml.url)) }}
{{- fail "defaultServer.url (or zenml.url) is required when defaultServer.create is true" }}
{{- end }}
{{- if eq (int .Values.livenessPort) (int .Values.metrics.port) }}
{{- fail "livenessPort and metrics.port must differ" }}
{{- end }}
{{- end }}

{{/*
The operator's RBAC rules, shared by the ClusterRole (scope=cluster) and the per-namespace
Roles (scope=namespaced). Each rule names the code that needs it; tests/chart/test_chart.py
holds the same table and fails when either side changes alone.
*/}}
{{- define "zenml-operator.rules" -}}
# Kopf watches the custom resources (list, watch) and patches them for its finalizer and
# its annotations (progress, last-handled-configuration); the operator re-reads one before
# acting (kube.KubeClient.get_object in main.py).
# ZenMLServer (namespaced) is watched and held by a finalizer the same way.
- apiGroups: ["zenml.io"]
  resources: ["serviceaccounts", "apikeyrotations", "zenmlservers"]
  verbs: ["get", "list", "watch", "patch"]
# kube.KubeClient.patch_status: status is written by the operator (intent records, Ready).
- apiGroups: ["zenml.io"]
  resources: ["serviceaccounts/status", "apikeyrotations/status", "zenmlservers/status"]
  verbs: ["patch"]
# Secrets carry an ownerReference to their ServiceAccount with blockOwnerDeletion (so a
# foreground deletion waits for them); clusters with the OwnerReferencesPermissionEnforcement
# admission plugin (OpenShift) allow that only to who may update the owner's finalizers.
# (Nothing is owned by a server resource: no zenmlservers/finalizers.)
- apiGroups: ["zenml.io"]
  resources: ["serviceaccounts/finalizers"]
  verbs: ["update"]
# kube.KubeClient.{get,create,patch,delete}_secret: the Secrets holding the issued keys.
# list/watch: secret_watch.SecretWatch follows the operator's own Secrets, filtered by the
# API server on the label app.kubernetes.io/managed-by=zenml-operator, to repair one within
# seconds (repairs.py); in the watched namespaces only when the scope is namespaced.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# kopf.event() and Kopf's own log posting (settings.posting): core v1 Events.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# ApiKeyRotation rolloutRestartTargets: read the workload, patch its pod template annotation.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "patch"]
{{- end }}

{{/*
ClusterZenMLServer is cluster-scoped: only a ClusterRole can grant it, also when
rbac.scope=namespaced. Watched, patched for the finalizer and annotations, status written.
*/}}
{{- define "zenml-operator.clusterServerRules" -}}
- apiGroups: ["zenml.io"]
  resources: ["clusterzenmlservers"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["zenml.io"]
  resources: ["clusterzenmlservers/status"]
  verbs: ["patch"]
{{- end }}

{{/*
Namespaces the Secrets of ClusterZenMLServer credentials may live in: the release
namespace, then serverCredentialNamespaces (comma-separated, no duplicates).
*/}}
{{- define "zenml-operator.credentialNamespaces" -}}
{{- $others := without (uniq (.Values.serverCredentialNamespaces | default list)) .Release.Namespace }}
{{- prepend $others .Release.Namespace | join "," }}
{{- end }}

{{/* Kopf peering (replicaCount > 1): watch the peering object and patch our heartbeat in. */}}
{{- define "zenml-operator.peeringRule" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  verbs: ["list", "watch", "patch"]
{{- end }}

{{/*
The Secrets of ClusterZenMLServer credentials (rbac.scope=namespaced, in a credential
namespace that is not watched): get, and list/watch with a field selector on the name, so
that a credential changed in place is picked up without a restart.
*/}}
{{- define "zenml-operator.credentialRules" -}}
# servers.ServerDirectory.read_credential: a GET by name (no list, no watch).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
