{{/*
Names and labels for kcloud-agent. The umbrella chart and the aggregator subchart use
the same scheme, so the names one subchart refers to in the other are predictable:
  <release>-agent, <release>-aggregator, <release>-agent-token.
*/}}

{{/* app.kubernetes.io/name: the application (the binary), not the chart. */}}
{{- define "kcloud-agent.name" -}}
{{- default "kcloud-agent" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object names: <release>-agent, unless fullnameOverride. */}}
{{- define "kcloud-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kcloud-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades (a DaemonSet's selector is immutable). */}}
{{- define "kcloud-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kcloud-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The recommended labels (kubernetes.io/docs/concepts/overview/working-with-objects/common-labels). */}}
{{- define "kcloud-agent.labels" -}}
{{ include "kcloud-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: kcloud
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "kcloud-agent.chart" . }}
{{- end -}}

{{- define "kcloud-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kcloud-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kcloud-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/*
The Secret holding the agents' token. The aggregator subchart generates it under the
same name (global.agentTokenSecret, default <release>-agent-token).
*/}}
{{- define "kcloud-agent.tokenSecretName" -}}
{{- .Values.global.agentTokenSecret | default (printf "%s-agent-token" .Release.Name) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Where pushes go: aggregatorUrl, else the aggregator subchart's Service. */}}
{{- define "kcloud-agent.aggregatorUrl" -}}
{{- if .Values.aggregatorUrl -}}
{{- .Values.aggregatorUrl -}}
{{- else -}}
{{- $service := printf "%s-aggregator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- printf "http://%s.%s.svc:8080" $service .Release.Namespace -}}
{{- end -}}
{{- end -}}
