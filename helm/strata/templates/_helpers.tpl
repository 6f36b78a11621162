{{/* Names and labels. The RayService, and the Service KubeRay creates for it, are named by strata.fullname. */}}
{{- define "strata.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "strata.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "strata.labels" -}}
{{ include "strata.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "strata.image" -}}
{{- $image := mergeOverwrite (deepCopy .root.Values.image) (.override | default dict) -}}
{{- printf "%s:%s" $image.repository $image.tag -}}
{{- end -}}

{{/*
Worker sizing from the models, as JSON {gpusPerPod, minReplicas, maxReplicas, replicas}.
A replica needs tensor_parallel_size x pipeline_parallel_size GPUs; a pod has gpusPerPod of them (default: the
largest tensor_parallel_size, so a tensor-parallel group never spans pods), so a replica takes
ceil(tp x pp / gpusPerPod) pods. With CPU-only workers (gpu.count 0) a replica takes one pod.
Also fails on values the schema cannot express (the same rules as ClusterConfig's validators).
*/}}
{{- define "strata.workerSizing" -}}
{{- $models := (include "strata.config" . | fromJson).models -}}
{{- $gpus := 0 -}}
{{- if kindIs "invalid" .Values.workers.gpu.count -}}
{{- range $models -}}{{- $gpus = max $gpus (int .tensor_parallel_size) -}}{{- end -}}
{{- else -}}
{{- $gpus = int .Values.workers.gpu.count -}}
{{- end -}}
{{- $min := 0 -}}{{- $max := 0 -}}{{- $initial := 0 -}}
{{- $names := list -}}
{{- range $models -}}
{{- $name := .name | default .model -}}
{{- if has $name $names -}}{{- fail (printf "strata.models: two models are served as %q; set `name:` on one" $name) -}}{{- end -}}
{{- $names = append $names $name -}}
{{- $tp := int .tensor_parallel_size -}}
{{- $pp := int .pipeline_parallel_size -}}
{{- $minR := int .min_replicas -}}
{{- $maxR := int .max_replicas -}}
{{- $initR := $minR -}}{{- if not (kindIs "invalid" .initial_replicas) -}}{{- $initR = int .initial_replicas -}}{{- end -}}
{{- if lt $maxR $minR -}}{{- fail (printf "strata.models[%s]: max_replicas (%d) must be at least min_replicas (%d)" $name $maxR $minR) -}}{{- end -}}
{{- $device := .device -}}
{{- $podsPerReplica := 1 -}}
{{- if gt $gpus 0 -}}
{{- if gt $tp $gpus -}}{{- fail (printf "strata.models[%s]: tensor_parallel_size %d does not fit in worker pods of %d GPUs (workers.gpu.count)" $name $tp $gpus) -}}{{- end -}}
{{- if ne $device "cuda" -}}{{- fail (printf "strata.models[%s]: set device: cuda on GPU workers (auto decides from the GPUs present when the app deploys, before GPU pods may exist)" $name) -}}{{- end -}}
{{- $podsPerReplica = div (add (mul $tp $pp) $gpus -1) $gpus -}}
{{- else if eq $device "cuda" -}}
{{- fail (printf "strata.models[%s]: device cuda needs GPU workers (workers.gpu.count is 0)" $name) -}}
{{- end -}}
{{- $min = add $min (mul $minR $podsPerReplica) -}}
{{- $max = add $max (mul $maxR $podsPerReplica) -}}
{{- $initial = add $initial (mul $initR $podsPerReplica) -}}
{{- end -}}
{{- if not (kindIs "invalid" .Values.workers.minReplicas) -}}{{- $min = int .Values.workers.minReplicas -}}{{- end -}}
{{- if not (kindIs "invalid" .Values.workers.maxReplicas) -}}{{- $max = int .Values.workers.maxReplicas -}}{{- end -}}
{{- if lt $max $min -}}{{- fail (printf "workers.maxReplicas (%d) must be at least workers.minReplicas (%d)" $max $min) -}}{{- end -}}
{{- dict "gpusPerPod" $gpus "minReplicas" $min "maxReplicas" $max "replicas" (min $max (max $min $initial)) | toJson -}}
{{- end -}}

{{/*
The `strata:` block, as JSON, with every key the user left unset taken from ClusterConfig's and ModelConfig's
defaults: files/config-defaults.yaml, which helm/generate_values_schema.py writes from cluster/config.py, so no
default is typed in the chart. The chart's own decisions (worker sizing, ports, the app name) read this; the
Serve config's args hold only what the user set, as `strata config render` writes them.
*/}}
{{- define "strata.config" -}}
{{- $defaults := .Files.Get "files/config-defaults.yaml" | fromYaml -}}
{{- $config := include "strata.overlay" (list $defaults.cluster .Values.strata) | fromJson -}}
{{- range $section := list "http" "limits" -}}
{{- $set := get $.Values.strata $section | default dict -}}
{{- $_ := set $config $section (include "strata.overlay" (list (get $defaults.cluster $section) $set) | fromJson) -}}
{{- end -}}
{{- $models := list -}}
{{- range .Values.strata.models -}}
{{- $models = append $models (include "strata.overlay" (list $defaults.model .) | fromJson) -}}
{{- end -}}
{{- $_ := set $config "models" $models -}}
{{- toJson $config -}}
{{- end -}}

{{/* (list DEFAULTS SET): DEFAULTS with every key of SET put over it, as JSON. (Sprig's merge would keep a default
where SET holds 0 or false.) */}}
{{- define "strata.overlay" -}}
{{- $out := deepCopy (index . 0) -}}
{{- range $key, $value := index . 1 -}}{{- $_ := set $out $key $value -}}{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "strata.port" -}}
{{- (include "strata.config" . | fromJson).http.port | int -}}
{{- end -}}

{{/*
The Serve config: what `strata config render --config FILE` prints for FILE = .Values.strata (cluster/cli.py,
render_command). tests/deploy/test_helm_chart.py holds the two equal.
*/}}
{{- define "strata.serveConfig" -}}
{{- if hasKey .Values.strata "api_keys" -}}
{{- fail "strata.api_keys would sit in the RayService in plain text: put the keys in a Secret and set apiKeySecret" -}}
{{- end -}}
{{- $config := include "strata.config" . | fromJson -}}
proxy_location: EveryNode
http_options:
  host: {{ $config.http.host }}
  port: {{ int $config.http.port }}
applications:
- name: {{ $config.app_name }}
  route_prefix: /
  import_path: cluster.app:build_app
  args:
    {{- toYaml .Values.strata | nindent 4 }}
{{- end -}}

{{/* Env, ports and mounts shared by the head and worker containers. */}}
{{- define "strata.env" -}}
{{- with .Values.hfTokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $.Values.hfTokenSecret.key }}}
{{- end }}
{{- with .Values.apiKeySecret.name }}
- name: STRATA_API_KEYS
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $.Values.apiKeySecret.key }}}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "strata.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "strata.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .sharedMemory }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* `ray start` flags: the user's, then the chart's forced ones; every value a string, as KubeRay wants. */}}
{{- define "strata.rayStartParams" -}}
{{- $params := dict -}}
{{- range $k, $v := .user -}}{{- $_ := set $params $k (toString $v) -}}{{- end -}}
{{- range $k, $v := .forced -}}{{- $_ := set $params $k $v -}}{{- end -}}
{{- if $params -}}{{- toYaml $params -}}{{- else -}}{}{{- end -}}
{{- end -}}
