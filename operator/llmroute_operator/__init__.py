"""llmroute operator: turns LLMRoutePolicy objects into sidecar config and injects the sidecar.

Two processes share this package. The reconciler (`handlers.run_operator`, kopf) renders each policy
into a ConfigMap the sidecars read, and reports on the policy's status. The admission server
(`webhooks.run_webhook`, aiohttp) injects the sidecar into annotated pods and relays providers'
status pages to them. The pure parts (`reconcile`, `injection`) hold the logic; the process modules
only move objects between those functions and the Kubernetes API. The policy model itself is the
sidecar's (`llmroute_sidecar.policy`): the operator never parses a policy its own way.
"""

GROUP = "llmroute.dev"
VERSION = "v1alpha1"
PLURAL = "llmroutepolicies"
KIND = "LLMRoutePolicy"

POLICY_ANNOTATION = f"{GROUP}/policy"
"""On a pod (template): the name of the LLMRoutePolicy, in the pod's namespace, to inject."""
INJECT_ANNOTATION = f"{GROUP}/inject"
"""On a pod: `"false"` opts out of injection even when a policy is named."""
INJECTED_ANNOTATION = f"{GROUP}/injected"
"""Written by the webhook: `<policy>@<configHash>`; its presence makes re-admission a no-op."""
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"
"""On the rendered ConfigMap: the configHash of the policy it was rendered from."""
LAST_GOOD_ANNOTATION = f"{GROUP}/last-good-config"
"""Written by the webhook on a pod injected with the policy's last good config instead of its current
spec (invalid, or not yet rendered): why."""
HOST_NETWORK_ANNOTATION = f"{GROUP}/inject-host-network"
"""On a pod with `hostNetwork: true`: `"true"` asks for the sidecar anyway (it then listens on the node's
loopback, shared with every host-network pod and process of the node); otherwise such pods are skipped."""
RESOURCE_ANNOTATIONS = {
    f"{GROUP}/sidecar-cpu-request": ("requests", "cpu"),
    f"{GROUP}/sidecar-memory-request": ("requests", "memory"),
    f"{GROUP}/sidecar-cpu-limit": ("limits", "cpu"),
    f"{GROUP}/sidecar-memory-limit": ("limits", "memory"),
}
"""On a pod: a Kubernetes quantity overriding one of the injected sidecar's resources."""
