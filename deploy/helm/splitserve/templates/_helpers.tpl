{{/* Names: <release>-splitserve (or the release name when it already contains "splitserve"). */}}
{{- define "splitserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "splitserve.labels" -}}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* The worker roles this release runs, in the order the gateway lists them. */}}
{{- define "splitserve.workerRoles" -}}
{{- if eq .Values.mode "colocated" -}}worker{{- else if eq .Values.mode "disaggregated" -}}prefill decode{{- else -}}
{{- fail (printf "mode must be disaggregated or colocated, got %q" .Values.mode) -}}
{{- end -}}
{{- end -}}

{{/* The headless Service of a worker role: its DNS name resolves to the role's ready pods. */}}
{{- define "splitserve.headlessName" -}}
{{- printf "%s-%s-headless" (include "splitserve.fullname" .root) .role -}}
{{- end -}}

{{- define "splitserve.modelArgs" -}}
{{- if .Values.model.path }}
- --model
- {{ .Values.model.path | quote }}
{{- end }}
{{- if .Values.model.servedModelName }}
- --served-model-name
- {{ .Values.model.servedModelName | quote }}
{{- end }}
{{- end -}}

{{- define "splitserve.env" -}}
- name: SPLITSERVE_CACHE
  value: /cache
{{- include "splitserve.secretEnv" .root }}
{{- range $name, $value := .root.Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- if .root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .root.Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .root.Values.otel.protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "splitserve-%s" .component | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name={{ .root.Release.Namespace }}"
{{- end }}
{{- end -}}

{{- define "splitserve.volumes" -}}
- name: cache
  emptyDir: {}
{{- include "splitserve.secretVolumes" . }}
{{- if .Values.model.persistentVolumeClaim }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.persistentVolumeClaim }}
    readOnly: true
{{- else if .Values.model.hostPath }}
- name: model
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- end }}
{{- end -}}

{{- define "splitserve.volumeMounts" -}}
- name: cache
  mountPath: /cache
{{- include "splitserve.secretMount" . }}
{{- if or .Values.model.persistentVolumeClaim .Values.model.hostPath }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "splitserve.podPlacement" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The address the gateway is given for a worker role: every pod its headless Service resolves
to, re-resolved as pods come and go (services/gateway/discovery.py). */}}
{{- define "splitserve.workerUrl" -}}
{{- $values := index .root.Values .role -}}
{{- printf "dns:///%s:%v" (include "splitserve.headlessName" .) $values.port -}}
{{- end -}}

{{/* The internal secret: mounted from its Secret, copied by an init container to a file of mode
0600 owned by the splitserve user (the mounted one is group-readable, which splitserve refuses). */}}
{{- define "splitserve.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 1000
  fsGroup: 1000
{{- if .Values.internalSecret.existingSecret }}
initContainers:
  - name: secret-file
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["sh", "-c", "install -m 600 /etc/splitserve/internal-secret/{{ .Values.internalSecret.secretKey }} /run/splitserve/secret"]
    volumeMounts:
      - name: internal-secret-source
        mountPath: /etc/splitserve/internal-secret
        readOnly: true
      - name: internal-secret
        mountPath: /run/splitserve
{{- end }}
{{- end -}}

{{- define "splitserve.secretEnv" -}}
{{- if .Values.internalSecret.existingSecret }}
- name: SPLITSERVE_SECRET_FILE
  value: /run/splitserve/secret
{{- end }}
{{- end -}}

{{- define "splitserve.secretMount" -}}
{{- if .Values.internalSecret.existingSecret }}
- name: internal-secret
  mountPath: /run/splitserve
  readOnly: true
{{- end }}
{{- end -}}

{{- define "splitserve.secretVolumes" -}}
{{- if .Values.internalSecret.existingSecret }}
- name: internal-secret-source
  secret:
    secretName: {{ .Values.internalSecret.existingSecret }}
    defaultMode: 0440
- name: internal-secret
  emptyDir:
    medium: Memory
{{- end }}
{{- end -}}
