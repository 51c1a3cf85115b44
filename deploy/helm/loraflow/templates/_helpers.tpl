{{/* Names, labels and the pieces every pod shares. */}}

{{- define "loraflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's name: fullname-component, within 63 characters. */}}
{{- define "loraflow.component" -}}
{{- printf "%s-%s" (include "loraflow.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "loraflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "loraflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (gateway, engine, ...). */}}
{{- define "loraflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraflow.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loraflow.componentLabels" -}}
{{ include "loraflow.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loraflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loraflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "loraflow.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The engines' headless Service, which gateways resolve to find every engine pod. */}}
{{- define "loraflow.engineService" -}}
{{- include "loraflow.component" (dict "root" . "component" "engine") -}}
{{- end -}}

{{- define "loraflow.engineDns" -}}
{{- printf "%s.%s.svc:%d" (include "loraflow.engineService" .) .Release.Namespace (int .Values.engine.port) -}}
{{- end -}}

{{- define "loraflow.isSqlite" -}}
{{- if and (not .Values.existingSecret) (hasPrefix "sqlite" .Values.registry.databaseUrl) -}}true{{- end -}}
{{- end -}}

{{/*
Checks that fail the render with a message naming the value to change. Included by every
workload, so `helm template` and `helm install` refuse the same things.
*/}}
{{- define "loraflow.validate" -}}
{{- if not .Values.baseModel -}}
{{- fail "baseModel is required: the hub id or model-cache path of the base model (--set baseModel=...)" -}}
{{- end -}}
{{- if not .Values.artifacts.uri -}}
{{- fail "artifacts.uri is required: an S3-compatible URI (s3://bucket/prefix) that gateways, engines and CronJobs all read" -}}
{{- end -}}
{{- if and (not .Values.existingSecret) (not .Values.registry.databaseUrl) -}}
{{- fail "the registry database is not set: put its URL in the Secret named by existingSecret (key secretKeys.databaseUrl), or set registry.databaseUrl to a sqlite:/// URL for a one-replica trial" -}}
{{- end -}}
{{- if and .Values.registry.databaseUrl (not (hasPrefix "sqlite" .Values.registry.databaseUrl)) -}}
{{- fail "registry.databaseUrl takes only a sqlite:/// URL: a PostgreSQL URL carries a password, so put it in the Secret named by existingSecret (key secretKeys.databaseUrl)" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not (and .Values.existingSecret .Values.secretKeys.metricsToken)) -}}
{{- fail "ingress.enabled publishes the gateways' /metrics (every tenant's adapters, the engines' private addresses) unless it needs a token: set secretKeys.metricsToken (a key of existingSecret), or keep ingress.enabled=false" -}}
{{- end -}}
{{- if and .Values.console.enabled (not .Values.apiKeys.enabled) -}}
{{- fail "console.enabled needs apiKeys.enabled=true: the console logs in with an API key, and without server.auth it refuses to listen beyond loopback. Set apiKeys.enabled=true, or keep console.enabled=false" -}}
{{- end -}}
{{- if and .Values.console.enabled (include "loraflow.isSqlite" .) -}}
{{- fail "console.enabled needs the registry in PostgreSQL (the database URL in existingSecret): a SQLite registry.databaseUrl is a file inside the gateway's pod, which the console's pod cannot read. Keep console.enabled=false for a SQLite trial" -}}
{{- end -}}
{{- if and .Values.console.enabled (gt (int .Values.console.replicas) 1) -}}
{{- fail (printf "console.replicas is %d, but each console pod signs its logins with a key it makes for itself (in its own LORAFLOW_HOME), so one replica would refuse another's sessions and forms: keep console.replicas=1" (int .Values.console.replicas)) -}}
{{- end -}}
{{- if and .Values.console.enabled .Values.console.ingress.enabled (not .Values.console.ingress.host) -}}
{{- fail "console.ingress.enabled needs console.ingress.host: the internal host name the console answers on" -}}
{{- end -}}
{{- if include "loraflow.isSqlite" . -}}
{{- $replicas := int .Values.gateway.replicas -}}
{{- if .Values.gateway.autoscaling.enabled -}}{{- $replicas = int .Values.gateway.autoscaling.maxReplicas -}}{{- end -}}
{{- if gt $replicas 1 -}}
{{- fail (printf "registry.databaseUrl is SQLite, which one gateway replica at most can use, but gateway.replicas (or autoscaling.maxReplicas) is %d: use PostgreSQL through existingSecret, or set gateway.replicas=1 and gateway.autoscaling.enabled=false" $replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* What every loraflow container reads: its settings file, a writable home, the artifact store. */}}
{{- define "loraflow.storageEnv" -}}
- name: LORAFLOW_CONFIG
  value: /etc/loraflow/loraflow.toml
- name: LORAFLOW_HOME
  value: /var/lib/loraflow
- name: HOME
  value: /var/lib/loraflow
- name: LORAFLOW_ARTIFACT_URI
  value: {{ .Values.artifacts.uri | quote }}
{{- with .Values.artifacts.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.artifacts.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.artifacts.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
{{- end -}}

{{/* The registry database, for the containers that use it (not the engines). */}}
{{- define "loraflow.databaseEnv" -}}
{{- if .Values.existingSecret }}
- name: LORAFLOW_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.existingSecret }}, key: {{ .Values.secretKeys.databaseUrl }}}
{{- else }}
- name: LORAFLOW_DATABASE_URL
  value: {{ .Values.registry.databaseUrl | quote }}
{{- end }}
{{- end -}}

{{- define "loraflow.env" -}}
{{ include "loraflow.storageEnv" . }}{{ include "loraflow.databaseEnv" . }}
{{- end -}}

{{/* Volumes every loraflow pod has: its settings, and writable scratch (the root filesystem is read-only). */}}
{{- define "loraflow.volumes" -}}
- name: config
  configMap:
    name: {{ include "loraflow.fullname" . }}
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "loraflow.volumeMounts" -}}
- name: config
  mountPath: /etc/loraflow
  readOnly: true
- name: home
  mountPath: /var/lib/loraflow
- name: tmp
  mountPath: /tmp
{{- end -}}
