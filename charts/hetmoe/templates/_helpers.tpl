{{/* Chart name, truncated to a DNS label. */}}
{{- define "hetmoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "hetmoe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "hetmoe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hetmoe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hetmoe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "hetmoe.labels" -}}
helm.sh/chart: {{ include "hetmoe.chart" . }}
{{ include "hetmoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hetmoe
{{- end -}}

{{- define "hetmoe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "hetmoe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* true when the operator watches a single namespace. */}}
{{- define "hetmoe.namespaced" -}}
{{- if eq .Values.operator.scope "namespace" -}}true{{- end -}}
{{- end -}}

{{/* The namespace watched in namespace scope (default: the release namespace). */}}
{{- define "hetmoe.watchNamespace" -}}
{{- default .Release.Namespace .Values.operator.watchNamespace -}}
{{- end -}}

{{/*
Name of cluster-scoped objects (ClusterRole, ClusterRoleBinding). In namespace scope
several teams may install the chart, one per namespace, so the name carries the
release namespace to keep installs from colliding.
*/}}
{{- define "hetmoe.clusterName" -}}
{{- if include "hetmoe.namespaced" . -}}
{{- printf "%s-%s" (include "hetmoe.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- include "hetmoe.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "hetmoe.catalogConfigMap" -}}
{{- printf "%s-catalog" (include "hetmoe.fullname" .) -}}
{{- end -}}

{{/* The catalog document exactly as hetmoe_operator.api.catalog.DeviceCatalog reads it. */}}
{{- define "hetmoe.catalogYaml" -}}
{{- $names := list -}}
{{- range .Values.catalog.grades -}}
{{- if has .name $names -}}
{{- fail (printf "catalog.grades: duplicate grade name %q (grade names must be unique)" .name) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- $catalog := dict "currency" (default "RMB" .Values.catalog.currency) "grades" .Values.catalog.grades -}}
{{- if hasKey .Values.catalog "crossPoolGbps" -}}
{{- $_ := set $catalog "crossPoolGbps" .Values.catalog.crossPoolGbps -}}
{{- end -}}
{{- toYaml $catalog -}}
{{- end -}}
