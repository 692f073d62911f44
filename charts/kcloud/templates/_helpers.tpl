{{/* Names and labels for the umbrella's own objects (the dashboard ConfigMap). */}}

{{- define "kcloud.fullname" -}}
{{- if contains "kcloud" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-kcloud" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kcloud.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The recommended labels. */}}
{{- define "kcloud.labels" -}}
app.kubernetes.io/name: kcloud
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kcloud
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "kcloud.chart" . }}
{{- end -}}

{{/* The aggregator subchart's object names (its fullname scheme). */}}
{{- define "kcloud.aggregatorFullname" -}}
{{- .Values.aggregator.fullnameOverride | default (printf "%s-aggregator" .Release.Name) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kcloud.bootstrapAdminSecret" -}}
{{- $full := include "kcloud.aggregatorFullname" . -}}
{{- $suffix := "bootstrap-admin" -}}
{{- .Values.aggregator.bootstrapAdmin.existingSecret | default (printf "%s-%s" ($full | trunc (int (sub 62 (len $suffix)))) $suffix) -}}
{{- end -}}
