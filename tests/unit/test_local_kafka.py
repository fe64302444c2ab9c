"""``chargify_stream.local.kafka``: what the launcher hands Kafka's storage tool."""

from __future__ import annotations

import base64
from unittest import mock

from chargify_stream.local import kafka


def test_a_cluster_id_never_starts_with_a_dash() -> None:
    # The first draw encodes to an id starting with "-"; the storage tool would take it for
    # an option, so the launcher draws again.
    dash_first = b"\xf8" + bytes(15)
    plain = bytes(range(16))
    assert base64.urlsafe_b64encode(dash_first).decode().startswith("-")
    with mock.patch.object(kafka.os, "urandom", side_effect=[dash_first, plain]):
        cluster_id = kafka._cluster_id()
    assert cluster_id == base64.urlsafe_b64encode(plain).decode().rstrip("=")
    assert len(cluster_id) == 22


def test_cluster_ids_are_random_url_safe_base64_of_16_bytes() -> None:
    ids = {kafka._cluster_id() for _ in range(500)}
    assert len(ids) == 500
    for cluster_id in ids:
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
