"""``chargify-stream connect URL``: point the Chargify site's webhooks at this pipeline.

What Chargify's dashboard does under Settings > Webhooks, through its API
(``shared/chargify/API.md`` §4): switch webhooks on for the site, then create the endpoint
for URL, or update the endpoint that already has that URL, so that it is subscribed to
exactly the events the pipeline acts on (:data:`EVENTS`). Chargify replaces an endpoint's
whole event list on update, so the list sent is always complete.

Idempotent: an endpoint already right is left alone and the command says so. The site's
webhook switch cannot be read through the API, so it is set every time; setting it to
what it already is changes nothing. ``--dry-run`` changes nothing and says what it would.

Other endpoints of the site are listed, never changed: they may belong to other systems.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from chargify_stream.base.errors import ConfigError, TransientError
from chargify_stream.base.settings import Settings
from chargify_stream.chargify_api import ChargifyApi, ChargifyUnavailable

__all__ = ["EVENTS", "EXIT_ENDPOINT_INOPERATIVE", "ConnectResult", "connect", "endpoint_advice"]

# The events this pipeline acts on (DESIGN.md); Chargify sends only what is subscribed.
EVENTS = (
    "payment_success",
    "signup_success",
    "subscription_state_change",
    "subscription_product_change",
    "component_allocation_change",
    "refund_success",
)
EXIT_ENDPOINT_INOPERATIVE = 3


def endpoint_advice(endpoint: dict[str, Any]) -> str | None:
    """What an operator should do about an endpoint that Chargify no longer sends to.

    Chargify pauses an endpoint after 25 failures in a row and disables it after about
    48 hours (API.md §4.4; the status strings other than ``enabled`` are unconfirmed).
    """
    status = str(endpoint.get("status") or "").lower()
    url = endpoint.get("url")
    if status in {"", "enabled"}:
        return None
    if status == "paused":
        return (
            f"endpoint {endpoint.get('id')} ({url}) is PAUSED: Chargify stopped sending to it "
            "after 25 failures in a row, keeps new webhooks unsent and tries again only every "
            "2 hours. Make sure the gateway answers at that URL, then send a test webhook from "
            "Chargify's Settings > Webhooks (or edit the endpoint's URL there) to re-enable "
            "it, and run `chargify-stream reconcile` to have the held webhooks replayed."
        )
    if status == "disabled":
        return (
            f"endpoint {endpoint.get('id')} ({url}) is DISABLED: Chargify creates no webhooks "
            "for it at all, so what happens now is only in Chargify's Events API (see "
            "`reconcile`'s events without a webhook). Fix the gateway, re-enable the endpoint "
            "by editing its URL in Chargify's Settings > Webhooks, then run "
            "`chargify-stream reconcile`."
        )
    return (
        f"endpoint {endpoint.get('id')} ({url}) has status {status!r}, not enabled: check it "
        "in Chargify's Settings > Webhooks."
    )


@dataclass
class ConnectResult:
    url: str
    dry_run: bool
    action: str  # "created", "updated", "unchanged"; "would create"/"would update" in dry run
    endpoint: dict[str, Any] | None
    previous_events: list[str] | None = None
    others: list[dict[str, Any]] = field(default_factory=list)
    webhooks_enabled: bool | None = None  # None: not set (dry run)

    @property
    def advice(self) -> str | None:
        return endpoint_advice(self.endpoint) if self.endpoint else None

    @property
    def changed(self) -> bool:
        return self.action in {"created", "updated"}

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "dry_run": self.dry_run,
            "action": self.action,
            "events": list(EVENTS),
            "previous_events": self.previous_events,
            "endpoint": self.endpoint,
            "endpoint_status": (self.endpoint or {}).get("status"),
            "advice": self.advice,
            "webhooks_enabled": self.webhooks_enabled,
            "other_endpoints": self.others,
        }


def check_url(url: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(
            f"URL {url!r} is not an http(s) URL; give the gateway's public address, "
            "e.g. https://hooks.example.com/webhooks/chargify"
        )
    return url


def connect(api: ChargifyApi, url: str, *, dry_run: bool = False) -> ConnectResult:
    """Make Chargify send exactly :data:`EVENTS` to ``url``; see the module docstring."""
    url = check_url(url)
    enabled: bool | None = None
    try:
        endpoints = api.endpoints()
        mine = next((e for e in endpoints if str(e.get("url", "")).strip() == url), None)
        others = [e for e in endpoints if e is not mine]
        if not dry_run:
            enabled = api.enable_webhooks(True)
        if mine is None:
            if dry_run:
                return ConnectResult(url, True, "would create", None, None, others)
            created = api.create_endpoint(url, EVENTS)
            return ConnectResult(url, False, "created", created, None, others, enabled)
        previous = sorted(str(e) for e in mine.get("webhook_subscriptions") or [])
        if previous == sorted(EVENTS):
            return ConnectResult(url, dry_run, "unchanged", mine, previous, others, enabled)
        if dry_run:
            return ConnectResult(url, True, "would update", mine, previous, others)
        updated = api.update_endpoint(int(mine["id"]), url, EVENTS)
        return ConnectResult(url, False, "updated", updated, previous, others, enabled)
    except ChargifyUnavailable as exc:
        done = (
            "the site's webhooks were switched on; the endpoint may or may not have been "
            "created or updated (running connect again is safe: it finds it)"
            if enabled
            else "nothing was changed"
        )
        raise TransientError(f"{exc}; {done}") from None


def run(args: argparse.Namespace, settings: Settings) -> int:
    api = ChargifyApi(settings.chargify_base_url(), settings.chargify_key())
    result = connect(api, args.url, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(result.as_json(), indent=2, sort_keys=True))
    else:
        _print(result)
    return EXIT_ENDPOINT_INOPERATIVE if result.advice else 0


def _print(result: ConnectResult) -> None:
    wanted = ", ".join(EVENTS)
    if result.dry_run:
        print("dry run: nothing was changed")
        print("would make sure webhooks are switched on for the site")
    elif result.webhooks_enabled:
        print("webhooks are switched on for the site")
    endpoint = result.endpoint or {}
    if result.action == "would create":
        print(f"would create an endpoint for {result.url} with events: {wanted}")
    elif result.action == "created":
        print(f"created endpoint {endpoint.get('id')} for {result.url} with events: {wanted}")
    elif result.action == "would update":
        print(
            f"would update endpoint {endpoint.get('id')} for {result.url}: events "
            f"{', '.join(result.previous_events or []) or '(none)'} -> {wanted}"
        )
    elif result.action == "updated":
        print(
            f"updated endpoint {endpoint.get('id')} for {result.url}: events "
            f"{', '.join(result.previous_events or []) or '(none)'} -> {wanted}"
        )
    else:
        print(
            f"endpoint {endpoint.get('id')} for {result.url} already has exactly these "
            f"events: {wanted}; nothing to change"
        )
    if endpoint:
        print(f"endpoint status: {endpoint.get('status') or 'unknown'}")
    if result.advice:
        print(result.advice)
    for other in result.others:
        print(
            f"note: the site has another endpoint {other.get('id')} ({other.get('url')}, "
            f"{other.get('status')}); it is left as it is, and receives its own copies "
            "with other webhook ids"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url", help="the gateway's public URL, e.g. https://hooks.example.com/webhooks/chargify"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="change nothing; say what would change"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
