"""The Kubernetes Pod Security Standards' `restricted` profile (baseline included), as a function.

What the `pod-security.kubernetes.io/enforce: restricted` admission checks for a pod spec, control by
control, from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (policy version
latest, Kubernetes 1.33). Each violation is returned as a line naming the control and the field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

ALLOWED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for index, container in enumerate(spec.get(field) or []):
            yield f"spec.{field}[{index}]", container


def _seccomp_ok(profile: Mapping[str, Any] | None) -> bool | None:
    """True/False for a set profile, None when unset."""
    if not profile:
        return None
    return profile.get("type") in ("RuntimeDefault", "Localhost")


def restricted_violations(pod: Mapping[str, Any]) -> list[str]:
    """Every way `pod` (a Pod or a pod template: metadata + spec) breaks the restricted profile."""
    spec: Mapping[str, Any] = pod.get("spec") or {}
    metadata: Mapping[str, Any] = pod.get("metadata") or {}
    problems: list[str] = []
    pod_context: Mapping[str, Any] = spec.get("securityContext") or {}

    # baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"host namespaces: spec.{field} is true")
    if (pod_context.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("hostProcess: spec.securityContext.windowsOptions.hostProcess")
    for index, volume in enumerate(spec.get("volumes") or []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            problems.append(f"hostPath volumes: spec.volumes[{index}]")
        if not kinds <= ALLOWED_VOLUME_TYPES:  # restricted
            problems.append(f"volume types: spec.volumes[{index}] is {sorted(kinds - ALLOWED_VOLUME_TYPES)}")
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"sysctls: {sysctl.get('name')}")
    if (pod_context.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
        problems.append("SELinux: spec.securityContext.seLinuxOptions.type")
    for key, value in (metadata.get("annotations") or {}).items():
        if (
            key.startswith("container.apparmor.security.beta.kubernetes.io/")
            and value not in ("runtime/default",)
            and not value.startswith("localhost/")
        ):
            problems.append(f"AppArmor: {key}")
    if (pod_context.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append("AppArmor: spec.securityContext.appArmorProfile is Unconfined")

    # restricted, pod level
    pod_non_root = pod_context.get("runAsNonRoot")
    pod_seccomp = _seccomp_ok(pod_context.get("seccompProfile"))
    if pod_seccomp is False:
        problems.append("seccomp: spec.securityContext.seccompProfile must be RuntimeDefault or Localhost")
    if pod_context.get("runAsUser") == 0:
        problems.append("runAsUser: spec.securityContext.runAsUser is 0")
    if pod_non_root is False:
        problems.append("runAsNonRoot: spec.securityContext.runAsNonRoot is false")

    for path, container in _containers(spec):
        context: Mapping[str, Any] = container.get("securityContext") or {}
        capabilities: Mapping[str, Any] = context.get("capabilities") or {}
        if context.get("privileged"):
            problems.append(f"privileged: {path}")
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"hostProcess: {path}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"host ports: {path} hostPort {port['hostPort']}")
        if context.get("procMount", "Default") != "Default":
            problems.append(f"/proc mount type: {path}")
        if (context.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
            problems.append(f"SELinux: {path}")
        if (context.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"AppArmor: {path}")
        added = set(capabilities.get("add") or [])
        if not added <= BASELINE_CAPABILITIES:
            problems.append(f"capabilities (baseline): {path} adds {sorted(added - BASELINE_CAPABILITIES)}")
        # restricted
        if not added <= {"NET_BIND_SERVICE"}:
            problems.append(f"capabilities: {path} adds {sorted(added - {'NET_BIND_SERVICE'})}")
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"capabilities: {path} must drop ALL")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"privilege escalation: {path} must set allowPrivilegeEscalation: false")
        non_root = context.get("runAsNonRoot", pod_non_root)
        if non_root is not True:
            problems.append(f"runAsNonRoot: {path} (nor the pod) sets runAsNonRoot: true")
        if context.get("runAsUser") == 0:
            problems.append(f"runAsUser: {path} runAsUser is 0")
        seccomp = _seccomp_ok(context.get("seccompProfile"))
        if seccomp is False or (seccomp is None and pod_seccomp is not True):
            problems.append(f"seccomp: {path} (nor the pod) sets seccompProfile RuntimeDefault or Localhost")
    return problems
