#!/usr/bin/env bash
# Builds the real Kubernetes control plane of `make e2e` from the Go module proxy: kube-apiserver and
# kube-controller-manager from k8s.io/kubernetes (kube/go.mod pins the release and its staging modules) and
# etcd from go.etcd.io/etcd/server/v3 at the version that release tests with (etcd/go.mod). Each binary
# lands once in .cache/e2e/<name>-<version>-<recipe>/ (recipe: a digest of this script and the build
# module) and is reused while neither changes; no kubelet, no
# scheduler: pods are admitted and stored, not run. Prints the folder of each binary (name=path), for the
# test fixture. Needs `go` (1.26 or newer) on PATH or at /usr/local/go/bin.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "make e2e needs the Go toolchain (go 1.26+) on PATH" >&2; exit 2; }
# Lean static binaries; -mod=mod lets a fresh clone fill the module cache from go.sum.
export CGO_ENABLED=0 GOFLAGS="-mod=mod -trimpath -buildvcs=false"
ldflags="-s -w"

version_of() {  # the version that go.mod requires for a module
  (cd "$1" && go list -m -f '{{.Version}}' "$2")
}

build() {  # build <module folder> <package> <binary name> <version> [extra ldflags] -> prints name=path
  local module=$1 package=$2 name=$3 version=$4 extra=${5:-}
  local recipe
  recipe=$(cat "$0" "$module/go.mod" "$module/go.sum" | sha256sum | cut -c1-8)
  local out="$root/.cache/e2e/$name-$version-$recipe/$name"
  if [[ ! -x "$out" ]]; then
    mkdir -p "$(dirname "$out")"
    echo "building $name $version (once; cached in .cache/e2e)" >&2
    (cd "$module" && go build -ldflags="$ldflags $extra" -o "$out.partial" "$package")
    mv "$out.partial" "$out"
  fi
  echo "$name=$out"
}

kube_version=$(version_of "$here/kube" k8s.io/kubernetes)
etcd_version=$(version_of "$here/etcd" go.etcd.io/etcd/server/v3)
# What Kubernetes' own build stamps (hack/lib/version.sh): without it the server reports v0.0.0-master,
# and helm refuses a chart whose kubeVersion it cannot satisfy.
minor=${kube_version#v*.}
stamp=""
for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $package.gitVersion=$kube_version -X $package.gitMajor=${kube_version:1:1}"
  stamp+=" -X $package.gitMinor=${minor%%.*} -X $package.gitTreeState=clean"
done
build "$here/etcd" . etcd "$etcd_version"
build "$here/kube" k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$kube_version" "$stamp"
build "$here/kube" k8s.io/kubernetes/cmd/kube-controller-manager kube-controller-manager "$kube_version" "$stamp"
