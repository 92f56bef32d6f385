"""`certificates.renew` on a fake clock: the webhook's CA outlives its leaves, and rotation keeps trust."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from llmroute_operator.certificates import DAY, Lifetimes, TlsState, dns_names_of, make_ca, make_leaf, renew

NAMES = ["llmroute-webhook", "llmroute-webhook.llmroute-system", "llmroute-webhook.llmroute-system.svc"]
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
LIFETIMES = Lifetimes()


def signed_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except Exception:
        return False
    return True


def round_trip(state: TlsState) -> TlsState:
    """What the next reader of the Secret gets."""
    return TlsState.from_secret_data(state.secret_data())


def test_a_fresh_install_gets_a_ca_that_outlives_its_leaf() -> None:
    state, reasons = renew(TlsState.from_secret_data({}), NAMES, T0)
    assert reasons
    [ca] = state.cas
    assert state.leaf is not None and signed_by(state.leaf, ca)
    assert sorted(dns_names_of(state.leaf)) == sorted(NAMES)
    assert ca.not_valid_after_utc - T0 == LIFETIMES.ca
    assert state.leaf.not_valid_after_utc - T0 == LIFETIMES.leaf
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not state.leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Nothing more to do until something is due: the Secret is not rewritten on every check.
    again = round_trip(state)
    assert renew(again, NAMES, T0 + 59 * DAY) == (again, [])


def test_a_leaf_near_expiry_is_renewed_by_the_same_ca() -> None:
    state = round_trip(renew(TlsState(), NAMES, T0)[0])
    renewed, reasons = renew(state, NAMES, T0 + 61 * DAY)  # 29 days left of 90
    assert reasons == ["the serving certificate is within its renewal window: renewed it"]
    assert renewed.cas == state.cas and renewed.ca_key == state.ca_key  # the bundle does not change
    assert renewed.leaf is not None and renewed.leaf != state.leaf
    assert signed_by(renewed.leaf, state.cas[0])
    assert renewed.leaf.not_valid_after_utc == T0 + 61 * DAY + LIFETIMES.leaf


def test_a_ca_near_expiry_gets_a_successor_trusted_before_any_leaf_uses_it() -> None:
    ca, ca_key = make_ca(T0, LIFETIMES.ca)
    leaf, leaf_key = make_leaf(ca, ca_key, NAMES, T0 + 3560 * DAY, LIFETIMES.leaf)
    state = round_trip(TlsState((ca,), ca_key, leaf, leaf_key))
    now = T0 + 3600 * DAY  # 50 days before the CA expires; the leaf has 50 days too

    step1, reasons = renew(state, NAMES, now)
    assert any("successor" in reason for reason in reasons)
    new_ca, old_ca = step1.cas
    assert old_ca == ca and new_ca != ca and step1.ca_key != ca_key
    assert step1.leaf == leaf  # not yet: the API server may not trust the new CA yet
    assert b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (new_ca, ca)) == step1.bundle()

    # Within the grace period nothing moves; after it, the leaf moves to the new CA, both CAs stay.
    assert renew(round_trip(step1), NAMES, now + HOUR / 2)[1] == []
    step2, reasons = renew(round_trip(step1), NAMES, now + 2 * HOUR)
    assert reasons == ["the bundle with the new CA is out: moved the serving certificate to it"]
    assert step2.leaf is not None and signed_by(step2.leaf, new_ca) and step2.cas == (new_ca, ca)

    # Once every replica serves the new leaf, the old CA leaves the bundle.
    assert renew(round_trip(step2), NAMES, now + 2 * HOUR + HOUR / 2)[1] == []
    step3, reasons = renew(round_trip(step2), NAMES, now + 4 * HOUR)
    assert reasons == ["the serving certificate moved to the new CA: dropped the old CA from the bundle"]
    assert step3.cas == (new_ca,) and step3.leaf == step2.leaf
    assert renew(round_trip(step3), NAMES, now + 5 * HOUR)[1] == []


def test_a_leaf_with_other_dns_names_is_reissued() -> None:
    state = round_trip(renew(TlsState(), ["old-webhook.llmroute-system.svc"], T0)[0])
    renewed, reasons = renew(state, NAMES, T0 + DAY)
    assert reasons == ["the serving certificate names other DNS names: re-issued it"]
    assert renewed.cas == state.cas and renewed.leaf is not None
    assert sorted(dns_names_of(renewed.leaf)) == sorted(NAMES)


def test_a_broken_or_foreign_secret_is_replaced() -> None:
    assert renew(TlsState.from_secret_data({"ca.crt": "bm90IGEgY2VydA==", "tls.key": "%%%"}), NAMES, T0)[1]
    # A leaf from some other CA (e.g. the chart's old helm mode) is re-issued by ours.
    other_ca, other_key = make_ca(T0, LIFETIMES.ca)
    foreign, foreign_key = make_leaf(other_ca, other_key, NAMES, T0, LIFETIMES.leaf)
    ours = round_trip(renew(TlsState(), NAMES, T0)[0])
    state = TlsState(ours.cas, ours.ca_key, foreign, foreign_key)
    renewed, reasons = renew(state, NAMES, T0 + DAY)
    assert reasons == ["the serving certificate is signed by no CA of the bundle: re-issued it"]
    assert renewed.leaf is not None and signed_by(renewed.leaf, ours.cas[0])
    # A CA key that is not the CA's own: a new CA (the old one could sign nothing).
    mismatched = TlsState(ours.cas, other_key, ours.leaf, ours.leaf_key)
    renewed, reasons = renew(mismatched, NAMES, T0 + DAY)
    assert reasons[0] == "no usable CA: made one" and len(renewed.cas) == 1 and renewed.cas != ours.cas
    assert renewed.leaf is not None and signed_by(renewed.leaf, renewed.cas[0])


def test_an_expired_ca_leaves_the_bundle() -> None:
    old_ca, old_key = make_ca(T0 - 3650 * DAY, LIFETIMES.ca)
    state = round_trip(renew(TlsState(), NAMES, T0)[0])
    with_expired = TlsState((*state.cas, old_ca), state.ca_key, state.leaf, state.leaf_key)
    renewed, reasons = renew(with_expired, NAMES, T0 + DAY)
    assert reasons == ["dropped an expired CA from the bundle"] and renewed.cas == state.cas


def test_a_leaf_due_when_the_ca_is_replaced_waits_for_the_new_bundle() -> None:
    """Both due in one check: the leaf (still valid for weeks) waits until the new CA is trusted everywhere."""
    ca, ca_key = make_ca(T0, LIFETIMES.ca)
    now = T0 + 3300 * DAY  # the CA has 350 days left
    leaf, leaf_key = make_leaf(ca, ca_key, NAMES, now - 70 * DAY, LIFETIMES.leaf)  # 20 days left
    step1, _ = renew(TlsState((ca,), ca_key, leaf, leaf_key), NAMES, now)
    assert len(step1.cas) == 2 and step1.leaf == leaf
    step2, reasons = renew(round_trip(step1), NAMES, now + 2 * HOUR)
    assert reasons == ["the serving certificate is within its renewal window: renewed it"]
    assert step2.leaf is not None and signed_by(step2.leaf, step1.cas[0]) and step2.cas == step1.cas
    # An expired leaf cannot wait: re-issued at once by the newest CA.
    expired, expired_key = make_leaf(ca, ca_key, NAMES, now - 100 * DAY, LIFETIMES.leaf)
    step, _ = renew(TlsState((ca,), ca_key, expired, expired_key), NAMES, now)
    assert step.leaf is not None and signed_by(step.leaf, step.cas[0]) and len(step.cas) == 2
