"""The webhook's own CA and serving certificate: what they should be at a given time (no I/O).

`webhook.tls.mode: operator` (the chart's default) makes no key material at render time, so
`helm template` and Argo CD renders stay identical; the webhook keeps a Secret current with `renew`
(`tls_keeper.py`) and patches the CA bundle into its MutatingWebhookConfiguration.

The CA outlives many leaves, so the bundle the API server trusts does not change when a leaf does
(kubelets and the API server take a while to see a new Secret or bundle). Order of changes:

- a leaf is re-issued by the newest CA when it is missing, broken, within `leaf_renew_before` of its
  expiry, or names other DNS names;
- a CA within `ca_renew_before` of its expiry gets a successor, *added* to the bundle (newest first);
  the leaf moves to it once the new bundle has been out for `grace`, and the old CA leaves the bundle
  once that leaf has been out for `grace` (every replica and the API server have seen both by then).
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAY = datetime.timedelta(days=1)
BACKDATE = datetime.timedelta(minutes=5)
"""Certificates start this long before they are made: clocks of API servers and nodes drift a little."""


@dataclass(frozen=True)
class Lifetimes:
    """How long certificates live and when they are replaced."""

    ca: datetime.timedelta = 3650 * DAY
    ca_renew_before: datetime.timedelta = 365 * DAY
    leaf: datetime.timedelta = 90 * DAY
    leaf_renew_before: datetime.timedelta = 30 * DAY
    grace: datetime.timedelta = datetime.timedelta(hours=1)
    """How long a new bundle (or leaf) is out before the next step relies on everyone having it."""


@dataclass(frozen=True)
class TlsState:
    """What the Secret holds: the trusted CAs (newest first), the newest CA's key, the serving pair."""

    cas: tuple[x509.Certificate, ...] = ()
    ca_key: ec.EllipticCurvePrivateKey | None = None
    leaf: x509.Certificate | None = None
    leaf_key: ec.EllipticCurvePrivateKey | None = None

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str] | None) -> TlsState:
        """Parse the Secret's base64 `data`; a key that is missing or unreadable counts as absent."""
        data = data or {}
        cas = tuple(_certificates(_decode(data.get("ca.crt"))))
        leaves = _certificates(_decode(data.get("tls.crt")))
        return cls(
            cas=cas,
            ca_key=_private_key(_decode(data.get("ca.key"))),
            leaf=leaves[0] if leaves else None,
            leaf_key=_private_key(_decode(data.get("tls.key"))),
        )

    def secret_data(self) -> dict[str, str]:
        """The Secret's base64 `data`: `ca.crt` (the bundle), `ca.key`, `tls.crt`, `tls.key`."""
        assert self.ca_key is not None and self.leaf is not None and self.leaf_key is not None
        return {
            "ca.crt": base64.b64encode(self.bundle()).decode(),
            "ca.key": base64.b64encode(_key_pem(self.ca_key)).decode(),
            "tls.crt": base64.b64encode(self.leaf.public_bytes(serialization.Encoding.PEM)).decode(),
            "tls.key": base64.b64encode(_key_pem(self.leaf_key)).decode(),
        }

    def bundle(self) -> bytes:
        """The PEM CA bundle for the webhook configuration's `caBundle`."""
        return b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in self.cas)


def make_ca(
    now: datetime.datetime, lifetime: datetime.timedelta
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate (it signs leaves only: path length 0) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"llmroute-webhook-ca-{now:%Y%m%d%H%M%S}")])
    certificate = (
        _builder(name, name, key.public_key(), now, lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def make_leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    dns_names: Sequence[str],
    now: datetime.datetime,
    lifetime: datetime.timedelta,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A serving certificate for `dns_names` (the first is its common name), signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    # Never past the CA: a leaf outliving its issuer would stop verifying first.
    lifetime = min(lifetime, ca.not_valid_after_utc - now)
    certificate = (
        _builder(subject, ca.subject, key.public_key(), now, lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, key


DEFAULT_LIFETIMES = Lifetimes()
DUE = "the serving certificate is within its renewal window: renewed it"


def renew(
    state: TlsState, dns_names: Sequence[str], now: datetime.datetime, lifetimes: Lifetimes = DEFAULT_LIFETIMES
) -> tuple[TlsState, list[str]]:
    """The state the Secret should hold at `now`, and why it changed (empty: keep it as it is)."""
    reasons: list[str] = []
    cas = [ca for ca in state.cas if ca.not_valid_after_utc > now]
    if len(cas) < len(state.cas):
        reasons.append("dropped an expired CA from the bundle")
    ca_key = state.ca_key
    if not cas or ca_key is None or not _same_key(cas[0], ca_key):
        reasons.append("no usable CA: made one")
        ca, ca_key = make_ca(now, lifetimes.ca)
        cas = [ca]  # without its key the old CA can sign nothing; a fresh leaf follows below
    elif cas[0].not_valid_after_utc - now <= lifetimes.ca_renew_before:
        reasons.append(f"the CA expires {cas[0].not_valid_after_utc:%Y-%m-%d}: made its successor")
        ca, ca_key = make_ca(now, lifetimes.ca)
        cas.insert(0, ca)
    newest = cas[0]

    leaf, leaf_key = state.leaf, state.leaf_key
    problem = _leaf_problem(leaf, leaf_key, cas, dns_names, now, lifetimes)
    settled = now - newest.not_valid_before_utc >= lifetimes.grace + BACKDATE
    if problem == DUE and leaf is not None and not settled and leaf.not_valid_after_utc - now > 2 * lifetimes.grace:
        problem = None  # merely due, and the newest CA may not be trusted everywhere yet: wait for it
    if problem is None and leaf is not None and not _signed_by(leaf, newest) and settled:
        problem = "the bundle with the new CA is out: moved the serving certificate to it"
    if problem is not None:
        reasons.append(problem)
        leaf, leaf_key = make_leaf(newest, ca_key, dns_names, now, lifetimes.leaf)
    assert leaf is not None and leaf_key is not None

    if len(cas) > 1 and _signed_by(leaf, newest) and now - leaf.not_valid_before_utc >= lifetimes.grace + BACKDATE:
        reasons.append("the serving certificate moved to the new CA: dropped the old CA from the bundle")
        cas = [newest]
    if not reasons:
        return state, []
    return TlsState(tuple(cas), ca_key, leaf, leaf_key), reasons


def _leaf_problem(
    leaf: x509.Certificate | None,
    key: ec.EllipticCurvePrivateKey | None,
    cas: Sequence[x509.Certificate],
    dns_names: Sequence[str],
    now: datetime.datetime,
    lifetimes: Lifetimes,
) -> str | None:
    """Why the serving certificate must be re-issued now, or None."""
    if leaf is None or key is None or not _same_key(leaf, key):
        return "no usable serving certificate: issued one"
    if not any(_signed_by(leaf, ca) for ca in cas):
        return "the serving certificate is signed by no CA of the bundle: re-issued it"
    if sorted(dns_names) != sorted(dns_names_of(leaf)):
        return "the serving certificate names other DNS names: re-issued it"
    if leaf.not_valid_after_utc - now <= lifetimes.leaf_renew_before:
        return DUE
    return None


def dns_names_of(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name) for name in names.get_values_for_type(x509.DNSName)]


def _signed_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_key(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return certificate.public_key() == key.public_key()


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
    )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _decode(value: str | None) -> bytes:
    try:
        return base64.b64decode(value or "", validate=True)
    except (binascii.Error, ValueError):
        return b""


def _certificates(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem) if pem else []
    except ValueError:
        return []


def _private_key(pem: bytes) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(pem, password=None) if pem else None
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None
