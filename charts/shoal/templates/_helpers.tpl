{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; the release name alone when it already contains the chart name. */}}
{{- define "shoal.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shoal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kubernetes recommended labels. */}}
{{- define "shoal.labels" -}}
helm.sh/chart: {{ include "shoal.chart" . }}
{{ include "shoal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: shoal
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The same selector as a label-selector string, for `--bootstrap-k8s-selector`. */}}
{{- define "shoal.selectorString" -}}
app.kubernetes.io/name={{ include "shoal.name" . }},app.kubernetes.io/instance={{ .Release.Name }}
{{- end }}

{{- define "shoal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shoal.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shoal.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Where the node's hosts directory appears inside the configure/cleanup containers. */}}
{{/* containerd's config_path may list directories separated by ":" (EKS); containerd looks in
the first one first, so that is the one shoal configures. */}}
{{- define "shoal.hostsDir" -}}
{{- first (splitList ":" .Values.containerd.hostsDir) }}
{{- end }}

{{- define "shoal.hostsMountPath" -}}
{{- printf "/host%s" (include "shoal.hostsDir" . | trimSuffix "/") }}
{{- end }}

{{/* The socket's directory: mounted instead of the socket so a containerd restart is survived. */}}
{{- define "shoal.socketDir" -}}
{{- dir .Values.containerd.socket }}
{{- end }}

{{/* The URL containerd uses to reach the node-local shoal. */}}
{{- define "shoal.mirrorURL" -}}
{{- $host := .Values.mirrorHost }}
{{- if not $host }}
{{- $host = ternary "127.0.0.1" "$(NODE_IP)" .Values.hostNetwork }}
{{- end }}
{{- printf "http://%s:%d" $host (int .Values.ports.registry) }}
{{- end }}

{{/* "true" or "false" for `configure --resolve-tags`. */}}
{{- define "shoal.resolveTags" -}}
{{- if eq (toString .Values.resolveTags) "auto" }}
{{- ne .Values.tagPolicy "digest-only" }}
{{- else }}
{{- .Values.resolveTags }}
{{- end }}
{{- end }}

{{/* The upstream allow-list: explicit, or the mirrored registries' names without `_default`
(an entry may be `host=<server URL>`). */}}
{{- define "shoal.upstreamRegistries" -}}
{{- if .Values.upstream.registries }}
{{- join "," .Values.upstream.registries }}
{{- else }}
{{- $names := list }}
{{- range .Values.registries }}
{{- $names = append $names (regexReplaceAll "=.*$" . "") }}
{{- end }}
{{- without $names "_default" | uniq | join "," }}
{{- end }}
{{- end }}

{{/* host:port for a listener; IPv6 hosts get brackets. */}}
{{- define "shoal.listen" -}}
{{- $host := .root.Values.bindAddress }}
{{- if contains ":" $host }}
{{- $host = printf "[%s]" $host }}
{{- end }}
{{- printf "%s:%d" $host (int .port) }}
{{- end }}

{{- define "shoal.headlessServiceName" -}}
{{- printf "%s-peers" (include "shoal.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fails rendering when values contradict each other in ways the schema cannot express. */}}
{{- define "shoal.validate" -}}
{{- if and (eq .Values.bootstrap.mode "static") (not .Values.bootstrap.staticPeers) }}
{{- fail "bootstrap.mode=static needs bootstrap.staticPeers" }}
{{- end }}
{{- if and (eq .Values.bootstrap.mode "kubernetes") (not .Values.rbac.create) (not .Values.serviceAccount.name) }}
{{- fail "bootstrap.mode=kubernetes without rbac.create needs serviceAccount.name bound to a Role that can list pods" }}
{{- end }}
{{- if and .Values.hostsConfig.enabled (not .Values.registries) }}
{{- fail "hostsConfig.enabled needs at least one entry in registries" }}
{{- end }}
{{- $ports := list (int .Values.ports.registry) (int .Values.ports.metrics) (int .Values.ports.p2p) }}
{{- if ne (len (uniq $ports)) 3 }}
{{- fail "ports.registry, ports.metrics and ports.p2p must differ" }}
{{- end }}
{{- end }}

{{/* Arguments of the configure init container, as a YAML list. */}}
{{- define "shoal.configureArgs" -}}
{{- $args := list "configure" (printf "--hosts-dir=%s" (include "shoal.hostsMountPath" .)) (printf "--mirror=%s" (include "shoal.mirrorURL" .)) }}
{{- range .Values.registries }}
{{- $args = append $args (printf "--registry=%s" .) }}
{{- end }}
{{- $args = append $args (printf "--resolve-tags=%s" (include "shoal.resolveTags" .)) }}
{{- toYaml $args }}
{{- end }}

{{/* Arguments of `shoal run`, as a YAML list. */}}
{{- define "shoal.runArgs" -}}
{{- $v := .Values }}
{{- $args := list "run"
    (printf "--log-level=%s" $v.logLevel)
    (printf "--containerd-socket=%s" $v.containerd.socket)
    (printf "--containerd-namespace=%s" $v.containerd.namespace) }}
{{- with $v.containerd.contentDir }}
{{- $args = append $args (printf "--content-root=%s" .) }}
{{- end }}
{{- $args = concat $args (list
    (printf "--data-dir=%s" $v.dataDir)
    (printf "--listen=%s" (include "shoal.listen" (dict "root" . "port" $v.ports.registry)))
    (printf "--metrics-listen=%s" (include "shoal.listen" (dict "root" . "port" $v.ports.metrics)))
    (printf "--p2p-listen=%s" (include "shoal.listen" (dict "root" . "port" $v.ports.p2p)))
    (printf "--bootstrap=%s" $v.bootstrap.mode)) }}
{{- if eq $v.bootstrap.mode "static" }}
{{- $args = append $args (printf "--bootstrap-peers=%s" (join "," $v.bootstrap.staticPeers)) }}
{{- else if eq $v.bootstrap.mode "dns" }}
{{- $args = append $args (printf "--bootstrap-dns=%s.%s.svc.%s" (include "shoal.headlessServiceName" .) .Release.Namespace $v.clusterDomain) }}
{{- else if eq $v.bootstrap.mode "kubernetes" }}
{{- $args = append $args (printf "--bootstrap-k8s-selector=%s" (include "shoal.selectorString" .)) }}
{{- end }}
{{- $args = concat $args (list
    (printf "--ready-alone=%t" $v.readyAlone)
    (printf "--mirror-registries=%s" (include "shoal.upstreamRegistries" .))
    (printf "--tag-policy=%s" $v.tagPolicy)) }}
{{- with $v.upstream.insecure }}
{{- $args = append $args (printf "--upstream-insecure=%s" (join "," .)) }}
{{- end }}
{{- if $v.upstream.credentials.secretName }}
{{- $args = append $args "--upstream-credentials=/etc/shoal/upstream/config.json" }}
{{- end }}
{{- if $v.p2p.psk.secretName }}
{{- $args = append $args "--p2p-psk=/etc/shoal/p2p/psk" }}
{{- end }}
{{- toYaml (concat $args $v.extraArgs) }}
{{- end }}
