{{/* The release's objects are named <release>-heed-<part> (or <release>-<part> when the release is called heed). */}}
{{- define "heed.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "heed.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: heed
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* heed.selector: the labels a part's pods are selected by; the part is the argument's "component". */}}
{{- define "heed.selector" -}}
app.kubernetes.io/name: heed
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "heed.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* "true" when the event log is PostgreSQL (in the chart or your own), else "" (SQLite). */}}
{{- define "heed.shared" -}}
{{- if or .Values.postgresql.enabled .Values.database.url .Values.database.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The Secret with HEED_API_KEYS and HEED_ADMIN_KEYS. */}}
{{- define "heed.keysSecret" -}}
{{- .Values.keys.existingSecret | default (printf "%s-keys" (include "heed.fullname" .)) -}}
{{- end -}}

{{/* The Secret with HEED_EVENT_LOG (PostgreSQL layout). */}}
{{- define "heed.databaseSecret" -}}
{{- .Values.database.existingSecret | default (printf "%s-database" (include "heed.fullname" .)) -}}
{{- end -}}

{{- define "heed.postgresqlName" -}}
{{- printf "%s-postgresql" (include "heed.fullname" .) -}}
{{- end -}}

{{/* The env entries every heed container has: the keys, the event log, the model cache. */}}
{{- define "heed.commonEnv" -}}
- {name: HEED_CACHE_DIR, value: /var/cache/heed}
{{- if include "heed.shared" . }}
- name: HEED_EVENT_LOG  # read when --event-log is not given; a URL with a password
  valueFrom: {secretKeyRef: {name: {{ include "heed.databaseSecret" . }}, key: HEED_EVENT_LOG}}
- {name: HEED_REGISTRY, value: /shared/registry}
{{- end }}
{{- end -}}

{{/* A pod's /dev/shm (vLLM's workers and torch share tensors through it). */}}
{{- define "heed.shmVolume" -}}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ . }}}
{{- end -}}
