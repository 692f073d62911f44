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

{{/* Checks on values the binary would otherwise refuse at start, with a clear message. */}}
{{- define "kcloud-aggregator.validate" -}}
{{- $mode := .Values.kubernetes.pinning.mode -}}
{{- if not (has $mode (list "env" "dra")) -}}
{{- fail (printf "kubernetes.pinning.mode must be env or dra, not %q" $mode) -}}
{{- end -}}
{{- range $i, $t := .Values.kubernetes.pinning.tolerations -}}
{{- if not (has ($t.operator | default "Equal") (list "Equal" "Exists")) -}}
{{- fail (printf "kubernetes.pinning.tolerations[%d].operator must be Equal or Exists" $i) -}}
{{- end -}}
{{- if and $t.effect (not (has $t.effect (list "NoSchedule" "PreferNoSchedule" "NoExecute"))) -}}
{{- fail (printf "kubernetes.pinning.tolerations[%d].effect must be NoSchedule, PreferNoSchedule or NoExecute" $i) -}}
{{- end -}}
{{- if and (eq ($t.operator | default "Equal") "Exists") $t.value -}}
{{- fail (printf "kubernetes.pinning.tolerations[%d]: operator Exists takes no value" $i) -}}
{{- end -}}
{{- if and (not $t.key) (ne ($t.operator | default "Equal") "Exists") -}}
{{- fail (printf "kubernetes.pinning.tolerations[%d]: without a key, operator must be Exists" $i) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.kubernetes.images -}}
{{- fail "kubernetes.images: at least one image (the first is the default)" -}}
{{- end -}}
{{- if or (le (int64 .Values.kubernetes.runAsUser) 0) (lt (int64 .Values.kubernetes.runAsGroup) 0) -}}
{{- fail "kubernetes.runAsUser must be > 0 (servers never run as root), runAsGroup >= 0" -}}
{{- end -}}
{{- if not (has .Values.provisioner (list "kubernetes" "local")) -}}
{{- fail (printf "provisioner must be kubernetes or local, not %q" .Values.provisioner) -}}
{{- end -}}
{{- range $k, $v := .Values.settings.default_quota -}}
{{- if not (has $k (list "gpus" "servers" "cpu_millis" "memory_bytes")) -}}
{{- fail (printf "settings.default_quota.%s: unknown (gpus, servers, cpu_millis, memory_bytes)" $k) -}}
{{- end -}}
{{- end -}}
{{- range $name, $p := .Values.settings.presets -}}
{{- if not (regexMatch "^[A-Za-z0-9_-]+$" $name) -}}
{{- fail (printf "settings.presets.%s: names are letters, digits, '-' and '_'" $name) -}}
{{- end -}}
{{- range $k, $_ := $p -}}
{{- if not (has $k (list "cpu_millis" "memory_bytes" "description")) -}}
{{- fail (printf "settings.presets.%s.%s: unknown (cpu_millis, memory_bytes, description)" $name $k) -}}
{{- end -}}
{{- end -}}
{{- if or (le (int64 ($p.cpu_millis | default 0)) 0) (lt (int64 ($p.memory_bytes | default 0)) 67108864) -}}
{{- fail (printf "settings.presets.%s: cpu_millis must be > 0 and memory_bytes >= 64 MiB (67108864)" $name) -}}
{{- end -}}
{{- end -}}
{{- with .Values.userOrigins.pattern -}}
{{- if not (regexMatch "^https?://\\{user\\}\\.[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:([0-9]+|\\{port\\}))?/?$" .) -}}
{{- fail (printf "userOrigins.pattern %q: http(s)://{user}.<host>[:port], e.g. https://{user}.users.kcloud.example.org" .) -}}
{{- end -}}
{{- end -}}
{{- range $i, $p := .Values.trustedProxies -}}
{{- if not (regexMatch "^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$" $p) -}}
{{- fail (printf "trustedProxies[%d] %q: an IP address or CIDR" $i $p) -}}
{{- end -}}
{{- end -}}
{{- range $i, $s := .Values.nfsShares -}}
{{- if not (and $s.name $s.server $s.path) -}}
{{- fail (printf "nfsShares[%d]: name, server and path are required" $i) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $s.name) -}}
{{- fail (printf "nfsShares[%d].name %q: a DNS label (lower case, digits, '-')" $i $s.name) -}}
{{- end -}}
{{- if not (hasPrefix "/" $s.path) -}}
{{- fail (printf "nfsShares[%d].path %q: must be absolute" $i $s.path) -}}
{{- end -}}
{{- if gt (len $s.name) 57 -}}
{{- fail (printf "nfsShares[%d].name %q: at most 57 characters (the pod volume is share-<name>)" $i $s.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The wildcard host of users' origins ("*.users.example.org"), from the pattern. */}}
{{- define "kcloud-aggregator.userHost" -}}
{{- $rest := .Values.userOrigins.pattern | trimPrefix "https://" | trimPrefix "http://" | trimPrefix "{user}." | trimSuffix "/" -}}
{{- printf "*.%s" (first (splitList ":" $rest)) -}}
{{- end -}}
