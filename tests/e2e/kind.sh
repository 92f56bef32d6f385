#!/usr/bin/env bash
# End to end on a real cluster (kind): build the image, install the chart (which installs the CRD), create
# a policy, ask for the sidecar on a Deployment's pod template and check that the pod gets a ready sidecar
# that answers the app on 127.0.0.1:8787.
# Needs docker, kind, kubectl and helm on PATH, and the registries for python:3.11-slim and busybox.
# Not run in CI here (no container engine).
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${LLMROUTE_KIND_CLUSTER:-llmroute-e2e}
IMAGE=ghcr.io/llmroute/llmroute:e2e
RELEASE=llmroute
RELEASE_NAMESPACE=llmroute-system
APP_NAMESPACE=demo
APP_IMAGE=${LLMROUTE_E2E_APP_IMAGE:-busybox:1.36}
CRD=llmroutepolicies.llmroute.dev
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e-kind needs $tool on PATH" >&2; exit 2; }
done
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER" >/dev/null
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

# The chart owns the CRD (crds.enabled=true, the default). A CRD left by `kubectl apply -f crds/` (an older
# run of this script) is handed over to the release: Helm adopts an object only with these marks.
if kubectl get crd "$CRD" >/dev/null 2>&1; then
  kubectl label crd "$CRD" app.kubernetes.io/managed-by=Helm --overwrite
  kubectl annotate crd "$CRD" meta.helm.sh/release-name="$RELEASE" \
    meta.helm.sh/release-namespace="$RELEASE_NAMESPACE" --overwrite
fi
helm upgrade --install "$RELEASE" charts/llmroute -n "$RELEASE_NAMESPACE" --create-namespace \
  --set image.tag=e2e --set image.pullPolicy=Never --wait --timeout 180s
kubectl wait "crd/$CRD" --for=condition=Established --timeout=60s

kubectl create namespace "$APP_NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$APP_NAMESPACE" create secret generic llm-keys --from-literal=anthropic=placeholder \
  --from-literal=openai=placeholder --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$APP_NAMESPACE" apply -f examples/cluster-policy.yaml
kubectl -n "$APP_NAMESPACE" wait llmroutepolicy/support-bot --for=condition=Ready --timeout=60s

# A stand-in app that exists in a public registry: it only sleeps; the sidecar is what is tested.
kubectl -n "$APP_NAMESPACE" apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: my-app
  labels: {app.kubernetes.io/name: my-app}
spec:
  replicas: 1
  selector:
    matchLabels: {app.kubernetes.io/name: my-app}
  template:
    metadata:
      labels: {app.kubernetes.io/name: my-app}
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: app
          image: $APP_IMAGE
          command: [sleep, "86400"]
          resources:
            requests: {cpu: 10m, memory: 16Mi}
            limits: {memory: 32Mi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
EOF
kubectl -n "$APP_NAMESPACE" rollout status deployment/my-app --timeout=180s

# The same step as the README and the chart's NOTES: the annotation goes on the pod template.
kubectl -n "$APP_NAMESPACE" patch deployment my-app --type merge -p \
  '{"spec":{"template":{"metadata":{"labels":{"llmroute.dev/inject":"true"},"annotations":{"llmroute.dev/policy":"support-bot"}}}}}'
kubectl -n "$APP_NAMESPACE" rollout status deployment/my-app --timeout=180s

POD=$(kubectl -n "$APP_NAMESPACE" get pods -l app.kubernetes.io/name=my-app \
  --sort-by=.metadata.creationTimestamp -o jsonpath='{.items[-1:].metadata.name}')  # the rolled-out one
kubectl -n "$APP_NAMESPACE" wait "pod/$POD" --for=condition=Ready --timeout=120s
INJECTED=$(kubectl -n "$APP_NAMESPACE" get pod "$POD" -o jsonpath='{.metadata.annotations.llmroute\.dev/injected}')
[[ -n "$INJECTED" ]] || { echo "e2e-kind: $POD has no llmroute.dev/injected annotation" >&2; exit 1; }
kubectl -n "$APP_NAMESPACE" get pod "$POD" \
  -o jsonpath='{.spec.initContainers[?(@.name=="llmroute")].restartPolicy}' | grep -qx Always
kubectl -n "$APP_NAMESPACE" exec "$POD" -c app -- printenv LLMROUTE_URL
kubectl -n "$APP_NAMESPACE" exec "$POD" -c app -- wget -qO- http://127.0.0.1:8787/readyz
echo
echo "e2e-kind: sidecar injected into $POD ($INJECTED), ready and answering the app"
