{{/*
Chart name, truncated to the 63 characters Kubernetes allows in a label.
*/}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, the prefix of every object's name. With the usual
release name "tandem" it is "tandem", so objects are named like the kustomize
install's (tandem-manager, tandem-agent, ...). Truncated to leave room for the
longest suffix ("-leader-election").
*/}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels on every object.
*/}}
{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
{{ include "tandem.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (immutable once installed: keep them minimal).
*/}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Per-component labels: call with (dict "ctx" $ "component" "manager").
*/}}
{{- define "tandem.componentLabels" -}}
{{ include "tandem.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of a Pod template: call with (dict "ctx" $ "component" "agent").
Without helm.sh/chart and app.kubernetes.io/version, which change with every
chart release: a Pod template label that changes rolls every Pod of the
workload, and rolling every agent interrupts the volumes it serves. A new
image changes the template anyway. The objects themselves keep both labels.
*/}}
{{- define "tandem.podLabels" -}}
{{ include "tandem.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: tandem
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "tandem.componentSelectorLabels" -}}
{{ include "tandem.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Object names.
*/}}
{{- define "tandem.managerName" -}}
{{- printf "%s-manager" (include "tandem.fullname" .) }}
{{- end }}

{{- define "tandem.agentName" -}}
{{- printf "%s-agent" (include "tandem.fullname" .) }}
{{- end }}

{{- define "tandem.leaderElectionName" -}}
{{- printf "%s-leader-election" (include "tandem.fullname" .) }}
{{- end }}

{{/*
The Secret holding the token shared by the manager and the agents, and the key
of the token in it.
*/}}
{{- define "tandem.tokenSecretName" -}}
{{- if .Values.agent.tokenSecret.existingSecret }}
{{- .Values.agent.tokenSecret.existingSecret }}
{{- else }}
{{- printf "%s-agent-token" (include "tandem.fullname" .) }}
{{- end }}
{{- end }}

{{- define "tandem.tokenSecretKey" -}}
{{- if .Values.agent.tokenSecret.existingSecret }}
{{- required "agent.tokenSecret.existingSecretKey must not be empty" .Values.agent.tokenSecret.existingSecretKey }}
{{- else }}
{{- "token" }}
{{- end }}
{{- end }}

{{/*
The image, tag defaulting to the chart's appVersion.
*/}}
{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
The token volume, identical in the manager and the agent: the key is always
mounted as the file "token" so both binaries read /etc/tandem/token/token.
Call with (dict "ctx" $ "mode" 0400).
*/}}
{{- define "tandem.tokenVolume" -}}
- name: agent-token
  secret:
    secretName: {{ include "tandem.tokenSecretName" .ctx }}
    defaultMode: {{ .mode }}
    items:
    - key: {{ include "tandem.tokenSecretKey" .ctx }}
      path: token
{{- end }}

{{/*
The mutual-TLS mode: "" (tls.enabled false), "issue" (the manager signs the
agents' CSRs) or "hostPath" (each node's certificate in a directory on the
node, the manager's in a Secret). Fails when hostPath lacks its values.
*/}}
{{- define "tandem.tlsMode" -}}
{{- if .Values.tls.enabled -}}
{{- $mode := .Values.tls.mode | default "issue" -}}
{{- if eq $mode "hostPath" -}}
{{- if not .Values.tls.hostPath.agentDir -}}
{{- fail "tls.mode=hostPath needs tls.hostPath.agentDir: the directory on every node holding that node's tls.crt, tls.key and ca.crt (docs/security.md, \"Certificates you provide\")" -}}
{{- end -}}
{{- if not .Values.tls.secret.managerSecretName -}}
{{- fail "tls.mode=hostPath needs tls.secret.managerSecretName: the kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) with the manager's certificate, URI SAN spiffe://tandem.dev/manager (docs/security.md, \"Certificates you provide\")" -}}
{{- end -}}
{{- end -}}
{{- $mode -}}
{{- end -}}
{{- end -}}
