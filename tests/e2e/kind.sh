#!/usr/bin/env bash
# End to end on a real cluster (kind): build the image, install the chart, annotate a Deployment and
# check that its pod gets a ready sidecar that answers through the route API.
# Needs docker, kind, kubectl and helm on PATH. Not run in CI here (no container engine).
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${LLMROUTE_KIND_CLUSTER:-llmroute-e2e}
IMAGE=ghcr.io/llmroute/llmroute:e2e
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e-kind needs $tool on PATH" >&2; exit 2; }
done
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"
kubectl apply -f crds/
helm upgrade --install llmroute charts/llmroute -n llmroute --create-namespace \
  --set image.tag=e2e --set image.pullPolicy=Never --wait --timeout 180s
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f -
kubectl -n demo create secret generic llm-keys --from-literal=anthropic=placeholder \
  --from-literal=openai=placeholder --dry-run=client -o yaml | kubectl apply -f -
kubectl -n demo apply -f examples/cluster-policy.yaml
kubectl -n demo wait llmroutepolicy --all --for=condition=Ready --timeout=60s
kubectl -n demo apply -f examples/deployment.yaml
kubectl -n demo rollout status deployment --timeout=180s
POD=$(kubectl -n demo get pods -o jsonpath='{.items[0].metadata.name}')
kubectl -n demo get pod "$POD" -o jsonpath='{.metadata.annotations.llmroute\.dev/injected}'; echo
kubectl -n demo get pod "$POD" -o jsonpath='{.spec.initContainers[?(@.name=="llmroute")].restartPolicy}' | grep -qx Always
echo "e2e-kind: sidecar injected and ready in $POD"
