{{/* Names, labels and the pieces the shard and router templates share. */}}

{{- define "rd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* The name prefix of every resource, at most 40 characters (pod names add -shard-S-R). */}}
{{- define "rd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The StatefulSet and headless Service of shard S: (dict "root" $ "shard" S). */}}
{{- define "rd.shardName" -}}
{{- printf "%s-shard-%d" (include "rd.fullname" .root) (int .shard) -}}
{{- end -}}

{{- define "rd.routerName" -}}
{{- printf "%s-router" (include "rd.fullname" .) -}}
{{- end -}}

{{- define "rd.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "shard"|"router" ["shard" S]). */}}
{{- define "rd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if hasKey . "shard" }}
retrieval-datastore/shard: {{ .shard | quote }}
{{- end }}
{{- end -}}

{{- define "rd.labels" -}}
{{ include "rd.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Every replica of every shard by its stable DNS name, as `retriever-server router --shards`
     takes them: shards joined by ",", the replicas of a shard by "|". */}}
{{- define "rd.shardAddresses" -}}
{{- $root := . -}}
{{- $shards := list -}}
{{- range $shard := until (int .Values.datastore.shards) -}}
{{- $name := include "rd.shardName" (dict "root" $root "shard" $shard) -}}
{{- $replicas := list -}}
{{- range $replica := until (int $root.Values.shard.replicas) -}}
{{- $replicas = append $replicas (printf "%s-%d.%s.%s.svc.%s:%d" $name $replica $name $root.Release.Namespace $root.Values.clusterDomain (int $root.Values.shard.port)) -}}
{{- end -}}
{{- $shards = append $shards (join "|" $replicas) -}}
{{- end -}}
{{- join "," $shards -}}
{{- end -}}

{{/* The flags of `retriever-server` itself, before the command. */}}
{{- define "rd.globalArgs" -}}
- --log-level
- {{ .Values.logLevel | upper | quote }}
- --log-format
- {{ .Values.logFormat | quote }}
{{- end -}}

{{/* Where the Secrets are mounted: the TLS Secret in every server, the clients' tokens in the router, and
     the shards' own tokens (the hop from the router) in the shards and the router. */}}
{{- define "rd.tlsDir" -}}/etc/retrieval/tls{{- end -}}
{{- define "rd.tokenDir" -}}/etc/retrieval/tokens{{- end -}}
{{- define "rd.shardTokenDir" -}}/etc/retrieval/shard-tokens{{- end -}}

{{/* The flags that secure a server's own port: TLS and tokens from the Secrets, or --insecure. A shard
     accepts the tokens of security.shardTokenSecret, the router those of security.tokenSecret.
     (dict "root" $ "shard" true|false) */}}
{{- define "rd.securityArgs" -}}
{{- $s := .root.Values.security -}}
{{- $root := .root -}}
{{- if $s.insecure }}
- --insecure
{{- else }}
- --tls-cert
- {{ include "rd.tlsDir" $root }}/tls.crt
- --tls-key
- {{ include "rd.tlsDir" $root }}/tls.key
{{- if $s.mutualTLS }}
- --tls-ca
- {{ include "rd.tlsDir" $root }}/ca.crt
{{- end }}
- --auth-token-file
- {{ include (ternary "rd.shardTokenDir" "rd.tokenDir" (default false .shard)) $root }}/tokens
{{- end }}
{{- if $s.reflection }}
- --reflection
{{- end }}
{{- end -}}

{{/* The router's flags for its calls to the shards: the same CA (and certificate for mutual TLS), and the
     first token of security.shardTokenSecret, which a client's token does not open. */}}
{{- define "rd.shardClientArgs" -}}
{{- $s := .Values.security -}}
{{- if not $s.insecure }}
- --shard-tls-ca
- {{ include "rd.tlsDir" . }}/ca.crt
{{- if $s.mutualTLS }}
- --shard-tls-cert
- {{ include "rd.tlsDir" . }}/tls.crt
- --shard-tls-key
- {{ include "rd.tlsDir" . }}/tls.key
{{- end }}
{{- with $s.shardServerName }}
- --shard-tls-server-name
- {{ . | quote }}
{{- end }}
- --shard-auth-token-file
- {{ include "rd.shardTokenDir" . }}/tokens
{{- end }}
{{- end -}}

{{/* The Secrets' volumes and mounts (none when insecure): the TLS Secret and the shards' tokens in every
     server, the clients' tokens in the router alone. Mode 0444: without an fsGroup the files are
     root's, and the servers run as uid 1000; the mount is read-only and seen by this pod alone.
     (dict "root" $ "shard" true|false) */}}
{{- define "rd.secretVolumes" -}}
{{- $s := .root.Values.security -}}
{{- if not $s.insecure }}
- name: tls
  secret:
    secretName: {{ $s.tlsSecret }}
    defaultMode: 0444
- name: shard-tokens
  secret:
    secretName: {{ $s.shardTokenSecret }}
    defaultMode: 0444
{{- if not .shard }}
- name: tokens
  secret:
    secretName: {{ $s.tokenSecret }}
    defaultMode: 0444
{{- end }}
{{- end }}
{{- end -}}

{{- define "rd.secretMounts" -}}
{{- if not .root.Values.security.insecure }}
- name: tls
  mountPath: {{ include "rd.tlsDir" .root }}
  readOnly: true
- name: shard-tokens
  mountPath: {{ include "rd.shardTokenDir" .root }}
  readOnly: true
{{- if not .shard }}
- name: tokens
  mountPath: {{ include "rd.tokenDir" .root }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* The flags every server takes: drain, limits, security, health and metrics. (dict "root" $ "server" ...
     "shard" true|false) */}}
{{- define "rd.serverArgs" -}}
{{- include "rd.securityArgs" (dict "root" .root "shard" (default false .shard)) }}
- --health-port
- {{ .root.Values.healthPort | quote }}
- --health-host
- 0.0.0.0
- --metrics-host
- {{ ternary "0.0.0.0" "127.0.0.1" .root.Values.metrics.expose | quote }}
- --drain-delay
- {{ .server.drainDelaySeconds | quote }}
- --grace
- {{ .server.graceSeconds | quote }}
- --max-k
- {{ .root.Values.limits.maxK | quote }}
- --max-batch
- {{ .root.Values.limits.maxBatch | quote }}
- --max-request-mb
{{- /* a shard takes 1 MiB more: what the router adds to a request it forwards (its datastore version) */}}
- {{ add .root.Values.limits.maxRequestMb (ternary 1 0 (default false .shard)) | quote }}
- --max-inflight
- {{ .root.Values.limits.maxInflight | quote }}
{{- range .server.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by shards and router: (dict "root" $ "server" ... "selector" dict). The grace
     period is whole seconds: the sum of the (possibly fractional) seconds, rounded up. */}}
{{- define "rd.podSpec" -}}
{{- $server := .server -}}
terminationGracePeriodSeconds: {{ addf $server.preStopSleepSeconds $server.drainDelaySeconds $server.graceSeconds $server.terminationMarginSeconds | ceil | int }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $server.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $server.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $server.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $affinity := deepCopy ($server.affinity | default dict) -}}
{{- if and (ne $server.antiAffinity "none") (not (hasKey $affinity "podAntiAffinity")) -}}
{{- $term := dict "labelSelector" (dict "matchLabels" .selector) "topologyKey" $server.antiAffinityTopologyKey -}}
{{- if eq $server.antiAffinity "hard" -}}
{{- $_ := set $affinity "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) -}}
{{- else -}}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) -}}
{{- end -}}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container-level settings shared by shards and router: (dict "root" $ "server" ... "values" "shard"|"router"). */}}
{{- define "rd.containerCommon" -}}
{{- $server := .server -}}
image: {{ include "rd.image" .root }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
ports:
  - name: grpc
    containerPort: {{ $server.port }}
    protocol: TCP
  - name: health
    containerPort: {{ .root.Values.healthPort }}
    protocol: TCP
  {{- if .root.Values.metrics.expose }}
  - name: metrics
    containerPort: {{ $server.metricsPort }}
    protocol: TCP
  {{- end }}
startupProbe:
  grpc:
    port: {{ .root.Values.healthPort }}
  {{- toYaml $server.probes.startup | nindent 2 }}
readinessProbe:
  grpc:
    port: {{ .root.Values.healthPort }}
  {{- toYaml $server.probes.readiness | nindent 2 }}
{{- /* Liveness asks for the health service "liveness", SERVING while the process's event loop answers,
    whatever the server's own status: a server that says NOT_SERVING on purpose (a shard whose background
    sha256 check failed) stays out of rotation, not restarted into serving again; a wedged one is restarted. */}}
livenessProbe:
  grpc:
    port: {{ .root.Values.healthPort }}
    service: liveness
  {{- toYaml $server.probes.liveness | nindent 2 }}
{{- if gt (int $server.preStopSleepSeconds) 0 }}
{{- /* The preStop hook's `sleep` action came with Kubernetes 1.30; the chart supports 1.28. */}}
{{- if not (semverCompare ">=1.30.0-0" .root.Capabilities.KubeVersion.Version) }}
{{- fail (printf "%s.preStopSleepSeconds needs Kubernetes 1.30 or newer (a preStop hook's sleep action), and this cluster is %s: set it to 0 (the server's own drain delay, %s.drainDelaySeconds, holds requests off while it stops)" .values .root.Capabilities.KubeVersion.Version .values) }}
{{- end }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ $server.preStopSleepSeconds }}
{{- end }}
{{- with $server.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "rd.podAnnotations" -}}
{{- if and .root.Values.metricsAnnotations .root.Values.metrics.expose }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .server.metricsPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .server.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}
