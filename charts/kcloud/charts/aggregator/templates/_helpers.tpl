{{/*
Names and labels for kcloud-aggregator. Same scheme as the agent subchart:
<release>-aggregator, and the shared <release>-agent-token Secret.
*/}}

{{/* app.kubernetes.io/name: the application (the binary), not the chart. */}}
{{- define "kcloud-aggregator.name" -}}
{{- default "kcloud-aggregator" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object names: <release>-aggregator, unless fullnameOverride. */}}
{{- define "kcloud-aggregator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<suffix>, kept within 63 characters. */}}
{{- define "kcloud-aggregator.suffixed" -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "kcloud-aggregator.fullname" (index . 0) | trunc (int (sub 62 (len $suffix)))) $suffix -}}
{{- end -}}

{{- define "kcloud-aggregator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "kcloud-aggregator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kcloud-aggregator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The recommended labels (kubernetes.io/docs/concepts/overview/working-with-objects/common-labels). */}}
{{- define "kcloud-aggregator.labels" -}}
{{ include "kcloud-aggregator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: aggregator
app.kubernetes.io/part-of: kcloud
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "kcloud-aggregator.chart" . }}
{{- end -}}

{{- define "kcloud-aggregator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kcloud-aggregator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kcloud-aggregator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The namespace server pods, their PVCs and Secrets live in. */}}
{{- define "kcloud-aggregator.serversNamespace" -}}
{{- .Values.kubernetes.namespace | default .Release.Namespace -}}
{{- end -}}

{{/* Secret names: an existing Secret when given, else the one this chart generates. */}}
{{- define "kcloud-aggregator.agentTokenSecretName" -}}
{{- .Values.global.agentTokenSecret | default (printf "%s-agent-token" .Release.Name) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "kcloud-aggregator.signingKeySecretName" -}}
{{- .Values.signingKey.existingSecret | default (include "kcloud-aggregator.suffixed" (list . "signing-key")) -}}
{{- end -}}
{{- define "kcloud-aggregator.bootstrapAdminSecretName" -}}
{{- .Values.bootstrapAdmin.existingSecret | default (include "kcloud-aggregator.suffixed" (list . "bootstrap-admin")) -}}
{{- end -}}

{{/*
A generated secret value, base64-encoded for a Secret's data: the value already in the
cluster when the Secret exists (so upgrades keep it), else a fresh random one. There is
no fixed default anywhere. Called with (dict "ctx" . "name" NAME "key" KEY "length" N).
*/}}
{{- define "kcloud-aggregator.generatedSecret" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- $data := dict -}}
{{- if $existing -}}{{- $data = $existing.data | default dict -}}{{- end -}}
{{- if hasKey $data .key -}}
{{- index $data .key -}}
{{- else -}}
{{- randAlphaNum (int .length) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* A TOML basic string (JSON string escapes are valid TOML escapes). */}}
{{- define "kcloud-aggregator.tomlString" -}}
{{- toJson (toString .) -}}
{{- end -}}

{{/* Checks a schema cannot express (values.schema.json holds the rest: types, enums,
     patterns, minimums, unknown keys), on values the binary would otherwise refuse at
     start. */}}
{{- define "kcloud-aggregator.validate" -}}
{{- range $i, $t := .Values.kubernetes.pinning.tolerations -}}
{{- if and (eq ($t.operator | default "Equal") "Exists") $t.value -}}
{{- fail (printf "kubernetes.pinning.tolerations[%d]: operator Exists takes no value" $i) -}}
{{- end -}}
{{- if and (not $t.key) (ne ($t.operator | default "Equal") "Exists") -}}
{{- fail (printf "kubernetes.pinning.tolerations[%d]: without a key, operator must be Exists" $i) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The wildcard host of users' origins ("*.users.example.org"), from the pattern. */}}
{{- define "kcloud-aggregator.userHost" -}}
{{- $rest := .Values.userOrigins.pattern | trimPrefix "https://" | trimPrefix "http://" | trimPrefix "{user}." | trimSuffix "/" -}}
{{- printf "*.%s" (first (splitList ":" $rest)) -}}
{{- end -}}
