{{/* The image <registry>/<name>:<tag>; tag defaults to "v" + appVersion. */}}
{{- define "weft.image" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- printf "%s/%s:%s" $root.Values.image.registry $name ($root.Values.image.tag | default (printf "v%s" $root.Chart.AppVersion)) -}}
{{- end -}}

{{/* Labels of every object: name (argument), part-of, Helm's standard ones. */}}
{{- define "weft.labels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/part-of: weft
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version }}
{{- end -}}

{{/* Selector labels (immutable in a Deployment or DaemonSet: name and instance only). */}}
{{- define "weft.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- end -}}

{{/* true when the identity service is configured (an issuer Secret or issuer PEMs). */}}
{{- define "weft.identity.enabled" -}}
{{- if or .Values.identity.issuer.existingSecret .Values.identity.issuer.crtPEM -}}true{{- end -}}
{{- end -}}

{{/* Name of the issuer Secret (tls.crt, tls.key). */}}
{{- define "weft.identity.issuerSecret" -}}
{{- .Values.identity.issuer.existingSecret | default "weft-identity-issuer" -}}
{{- end -}}

{{/* Name of the trust-anchors ConfigMap (ca.crt), the one the controller and proxies mount. */}}
{{- define "weft.identity.trustAnchorsConfigMap" -}}
{{- .Values.identity.trustAnchors.existingConfigMap | default "weft-trust-anchors" -}}
{{- end -}}

{{/* The container securityContext every Weft container but the CNI agent's runs with. */}}
{{- define "weft.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The injector's serving-certificate Secret name. */}}
{{- define "weft.injector.tlsSecret" -}}
{{- if eq .Values.injector.tls.mode "existingSecret" -}}
{{- required "injector.tls.existingSecret: the kubernetes.io/tls Secret of the injector (injector.tls.mode existingSecret)" .Values.injector.tls.existingSecret -}}
{{- else -}}
weft-injector-tls
{{- end -}}
{{- end -}}

{{/*
mode generate: a CA and a serving certificate for weft-injector.<ns>.svc, made once per
render and memoised in .Values (so the Secret and the caBundle agree), as a Secret.
*/}}
{{- define "weft.injector.tlsPair" -}}
{{- if not (hasKey .Values.injector.tls "_generated") -}}
{{- $days := int .Values.injector.tls.generatedValidityDays -}}
{{- $ca := genCA "weft-injector-ca" $days -}}
{{- $svc := printf "weft-injector.%s.svc" .Release.Namespace -}}
{{- $cert := genSignedCert $svc nil (list $svc (printf "%s.%s" $svc .Values.controller.clusterDomain)) $days $ca -}}
{{- $_ := set .Values.injector.tls "_generated" (dict "ca" $ca.Cert "crt" $cert.Cert "key" $cert.Key) -}}
{{- end -}}
{{- end -}}

{{- define "weft.injector.tls" -}}
{{- include "weft.injector.tlsPair" . -}}
{{- $g := .Values.injector.tls._generated -}}
apiVersion: v1
kind: Secret
metadata:
  name: weft-injector-tls
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "weft.labels" (list . "weft-injector") | nindent 4 }}
type: kubernetes.io/tls
data:
  tls.crt: {{ $g.crt | b64enc }}
  tls.key: {{ $g.key | b64enc }}
  ca.crt: {{ $g.ca | b64enc }}
{{- end -}}

{{/* The webhook's caBundle (base64 PEM); empty with cert-manager. */}}
{{- define "weft.injector.caBundle" -}}
{{- if eq .Values.injector.tls.mode "generate" -}}
{{- include "weft.injector.tlsPair" . -}}
{{- .Values.injector.tls._generated.ca | b64enc -}}
{{- else if eq .Values.injector.tls.mode "existingSecret" -}}
{{- required "injector.tls.caBundle: base64 PEM of the CA of the injector's certificate (injector.tls.mode existingSecret)" .Values.injector.tls.caBundle -}}
{{- end -}}
{{- end -}}
