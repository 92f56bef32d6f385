"""kopf's diff base as a digest: what kopf needs to tell an edit from a replay, in 72 bytes.

kopf keeps the last handled essence of each object (spec, labels, annotations) to compute the diff of
the next event; its annotation storage writes the whole essence into an annotation. A policy with long
prompts would hit the 256 KiB limit on an object's annotations, and every patch of kopf's would be
refused (422). The reconciler never reads `old` or `diff` (it renders the whole policy each time), so a
digest is enough: when the stored digest matches the current essence, the current essence is returned
as the old one (no diff: nothing to do); when it does not, an empty essence is (a diff: reconcile).
An annotation of the previous operator, holding the essence itself, is still read.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import cast

import kopf

DIGEST_PREFIX = "sha256:"


def essence_digest(essence: kopf.BodyEssence) -> str:
    """A stable digest of an essence (key order does not matter)."""
    canonical = json.dumps(essence, sort_keys=True, separators=(",", ":"), default=str)
    return DIGEST_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


class DigestDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """`kopf.AnnotationsDiffBaseStorage` storing `sha256:<hex>` of the essence instead of the essence.

    kopf stores the essence after its progress storage cleared it (our annotations under `prefix/` are
    gone), and builds the next one before clearing: both are digested without those annotations."""

    def _digest(self, essence: kopf.BodyEssence) -> str:
        cleared = copy.deepcopy(essence)
        annotations = cleared.get("metadata", {}).get("annotations", {})
        self.remove_annotations(cleared, {key for key in annotations if key.startswith(f"{self.prefix}/")})
        self.remove_empty_stanzas(cleared)
        return essence_digest(cleared)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        for full_key in self.make_keys(self.key, body=body):
            stored = body.metadata.annotations.get(full_key)
            if stored is None:
                continue
            stored = stored.strip()
            if not stored.startswith(DIGEST_PREFIX):
                return cast(kopf.BodyEssence, json.loads(stored))  # written by the previous operator
            current = self.build(body=body)
            return current if self._digest(current) == stored else cast(kopf.BodyEssence, {})
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        for full_key in self.make_keys(self.key, body=body):
            patch.metadata.annotations[full_key] = self._digest(essence)
        self._store_marker(prefix=self.prefix, patch=patch, body=body)
