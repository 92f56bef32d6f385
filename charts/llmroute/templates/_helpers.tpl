{{/*
Names, labels and the pieces the operator and webhook Deployments share.
*/}}

{{- define "llmroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every resource: truncated so suffixes like "-webhook" still fit 63 chars. */}}
{{- define "llmroute.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llmroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels on every resource. */}}
{{- define "llmroute.labels" -}}
helm.sh/chart: {{ include "llmroute.chart" . }}
app.kubernetes.io/name: {{ include "llmroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmroute
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component; call with (dict "context" $ "component" "operator"). */}}
{{- define "llmroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmroute.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's resources and pods: standard labels plus the component. */}}
{{- define "llmroute.componentLabels" -}}
{{ include "llmroute.labels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "llmroute.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "llmroute.sidecarImage" -}}
{{- $repository := default .Values.image.repository .Values.sidecar.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.sidecar.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "llmroute.sidecarPullPolicy" -}}
{{- default .Values.image.pullPolicy .Values.sidecar.image.pullPolicy }}
{{- end }}

{{- define "llmroute.operatorServiceAccount" -}}
{{- printf "%s-operator" (include "llmroute.fullname" .) }}
{{- end }}

{{- define "llmroute.webhookServiceAccount" -}}
{{- printf "%s-webhook" (include "llmroute.fullname" .) }}
{{- end }}

{{- define "llmroute.webhookService" -}}
{{- printf "%s-webhook" (include "llmroute.fullname" .) }}
{{- end }}

{{- define "llmroute.relayService" -}}
{{- printf "%s-relay" (include "llmroute.fullname" .) }}
{{- end }}

{{/*
The kopf peering name the reconciler replicas share (a ClusterKopfPeering): empty for one replica, which
runs standalone. Several replicas of a cluster-wide operator need peering so only one of them acts.
*/}}
{{- define "llmroute.peering" -}}
{{- if gt (int .Values.operator.replicas) 1 }}
{{- include "llmroute.fullname" . }}
{{- end }}
{{- end }}

{{/* Who makes the webhook's certificates: operator, helm or certManager (certManager.enabled wins). */}}
{{- define "llmroute.tlsMode" -}}
{{- if .Values.certManager.enabled }}certManager{{ else }}{{ .Values.webhook.tls.mode }}{{ end }}
{{- end }}

{{/* The webhook's TLS Secret. Another name in operator mode: that one is Opaque (the chart creates it
empty), and a Secret's type cannot change on the upgrade from the kubernetes.io/tls one of helm mode. */}}
{{- define "llmroute.tlsSecret" -}}
{{- if eq (include "llmroute.tlsMode" .) "operator" }}
{{- printf "%s-webhook-certs" (include "llmroute.fullname" .) }}
{{- else }}
{{- printf "%s-webhook-tls" (include "llmroute.fullname" .) }}
{{- end }}
{{- end }}

{{/* The names of the webhook's serving certificate: its Service's. */}}
{{- define "llmroute.webhookDnsNames" -}}
{{- $service := include "llmroute.webhookService" . }}
{{- $ns := .Release.Namespace }}
{{- list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.cluster.local" $service $ns) | join "," }}
{{- end }}

{{/* Restricted Pod Security Standard: what both Deployments run with. */}}
{{- define "llmroute.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "llmroute.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Environment shared by the operator and the webhook. */}}
{{- define "llmroute.env" -}}
- name: LLMROUTE_SIDECAR_IMAGE
  value: {{ include "llmroute.sidecarImage" . | quote }}
- name: LLMROUTE_STATUS_RELAY
  value: {{ printf "http://%s.%s.svc:8080" (include "llmroute.relayService" .) .Release.Namespace | quote }}
- name: LLMROUTE_UNKNOWN_POLICY
  value: {{ .Values.webhook.unknownPolicy | quote }}
- name: LLMROUTE_SIDECAR_METRICS_PORT
  value: {{ .Values.monitoring.sidecarMetricsPort | quote }}
- name: LLMROUTE_PROVIDER_HOSTS
  value: {{ join "," .Values.operator.providerHosts | quote }}
{{- end }}
