"""A small client of Chargify's (Maxio Advanced Billing) management API.

Only what ``reconcile`` and ``connect`` need: list webhooks, replay webhooks, the site's
webhook switch, list/create/update endpoints, list events. The facts it relies on, with
their sources and what could not be confirmed, are in ``shared/chargify/API.md``; the
section numbers below refer to it.

- Authentication is HTTP Basic with the API key as user and ``X`` as password (§1.2).
- Lists are paged by number (``page`` from 1, ``per_page`` at most 200, §2.1); a page
  shorter than asked for, or empty, is the last one.
- Chargify limits each site to 4 requests in flight and answers ``429`` beyond that,
  asking clients to pause "a few minutes" (§1.5). This client makes one request at a time
  and retries a 429 with growing pauses. A request that was not answered, or answered
  with a 5xx, is retried only when repeating it cannot do anything twice (GET, PUT).
- A ``401`` is a wrong ``CHARGIFY_API_KEY``: :class:`ChargifyAuthError`, a configuration
  error naming the variable. Nothing about the key is ever logged or put in a message, and
  redirects are not followed (they would carry the key elsewhere).

::

    ChargifyStreamError
     +-- ConfigError
     |    +-- ChargifyAuthError     401: the key is wrong
     +-- ChargifyApiError           any other refusal (404, 422, ...), with Chargify's errors
     +-- TransientError
          +-- ChargifyUnavailable   no answer, 5xx, or still 429 after every retry
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from chargify_stream.base.errors import ChargifyStreamError, ConfigError, TransientError
from chargify_stream.base.retry import backoff

__all__ = [
    "MAX_PER_PAGE",
    "MAX_REPLAY_IDS",
    "ChargifyApi",
    "ChargifyApiError",
    "ChargifyAuthError",
    "ChargifyUnavailable",
]

log = logging.getLogger(__name__)

MAX_PER_PAGE = 200  # API.md §2.1: larger values are clamped to 200
MAX_REPLAY_IDS = 1000  # API.md §3: "up to 1000 webhook IDs"
# Chargify cuts every request off at 120 s (§1.5); waiting longer is pointless.
REQUEST_TIMEOUT_S = 120.0
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_IDEMPOTENT = frozenset({"GET", "PUT"})


class ChargifyAuthError(ConfigError):
    """Chargify answered 401: ``CHARGIFY_API_KEY`` is wrong for this site."""


class ChargifyApiError(ChargifyStreamError):
    """Chargify refused a request (404, 422, ...); ``errors`` holds its messages."""

    def __init__(self, message: str, *, status: int, errors: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.errors = tuple(errors)


class ChargifyUnavailable(TransientError):
    """No usable answer from Chargify (unreachable, 5xx, or throttled past every retry)."""


class ChargifyApi:
    """One site's API at ``base_url`` (e.g. ``https://acme.chargify.com``).

    ``backoff`` is the first pause after a 429 (doubled each time up to ``max_backoff``,
    at most ``retries`` times: about 5 minutes in all, as Chargify asks). No answer or a
    5xx is retried ``fault_retries`` times, ``fault_pause`` apart (doubled), and only for
    GET and PUT. Tests pass small values and their own ``sleep``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = REQUEST_TIMEOUT_S,
        retries: int = 6,
        backoff: float = 5.0,
        max_backoff: float = 120.0,
        fault_retries: int = 2,
        fault_pause: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        token = base64.b64encode(f"{api_key}:X".encode()).decode("ascii")
        self._auth = f"Basic {token}"
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.fault_retries = fault_retries
        self.fault_pause = fault_pause
        self._sleep = sleep
        self.requests = 0  # made, retries included: for reports and tests

    def __repr__(self) -> str:  # never the key
        return f"ChargifyApi({self.base_url!r})"

    # -- operations ------------------------------------------------------------------

    def webhooks(self, **query: Any) -> Iterator[dict[str, Any]]:
        """Every webhook record matching ``query`` (``status``, ``since_date``,
        ``until_date``, ``order``, ``subscription``), page by page (§2)."""
        for item in self._pages("/webhooks.json", query):
            yield dict(item["webhook"])

    def replay(self, ids: Sequence[int]) -> None:
        """Queue re-delivery of up to 1000 webhooks (§3). Chargify answers at once and
        sends later."""
        if not 0 < len(ids) <= MAX_REPLAY_IDS:
            raise ValueError(f"replay takes 1 to {MAX_REPLAY_IDS} ids, not {len(ids)}")
        answer = self.request("POST", "/webhooks/replay.json", body={"ids": list(ids)})
        if not isinstance(answer, dict) or answer.get("status") != "ok":
            raise ChargifyApiError(f"replay answered {answer!r}, not status ok", status=200)

    def enable_webhooks(self, enabled: bool = True) -> bool:
        """Set the site's webhook switch (§4.1); return the switch as Chargify reports it."""
        answer = self.request("PUT", "/webhooks/settings.json", body={"webhooks_enabled": enabled})
        return bool(answer.get("webhooks_enabled")) if isinstance(answer, dict) else enabled

    def endpoints(self) -> list[dict[str, Any]]:
        """The site's webhook endpoints: a bare array, not paged (§4.3)."""
        answer = self.request("GET", "/endpoints.json")
        return [dict(e) for e in answer] if isinstance(answer, list) else []

    def create_endpoint(self, url: str, events: Sequence[str]) -> dict[str, Any]:
        body = {"endpoint": {"url": url, "webhook_subscriptions": list(events)}}
        return dict(self.request("POST", "/endpoints.json", body=body)["endpoint"])

    def update_endpoint(self, endpoint_id: int, url: str, events: Sequence[str]) -> dict[str, Any]:
        """Replace the endpoint's URL and its *complete* list of events (§4.3)."""
        body = {"endpoint": {"url": url, "webhook_subscriptions": list(events)}}
        path = f"/endpoints/{int(endpoint_id)}.json"
        return dict(self.request("PUT", path, body=body)["endpoint"])

    def events(self, **query: Any) -> Iterator[dict[str, Any]]:
        """Site events matching ``query`` (``filter`` as a list of keys, ``direction``,
        ``since_id``, ``max_id``, ``date_field``, ``start_date``, ``end_date``, ...) (§5)."""
        if "filter" in query and not isinstance(query["filter"], str):
            query["filter"] = ",".join(query["filter"])
        for item in self._pages("/events.json", query):
            yield dict(item["event"])

    # -- transport -------------------------------------------------------------------

    def _pages(self, path: str, query: Mapping[str, Any]) -> Iterator[Any]:
        per_page = min(int(query.get("per_page", MAX_PER_PAGE)), MAX_PER_PAGE)
        page = 1
        while True:
            params = {**query, "per_page": per_page, "page": page}
            items = self.request("GET", path, query=params)
            if not isinstance(items, list):
                raise ChargifyApiError(f"GET {path} answered {type(items).__name__}", status=200)
            yield from items
            if len(items) < per_page:
                return
            page += 1

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> Any:
        """One API call, with the retries described in the module docstring."""
        url = self.base_url + path
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        throttled = faults = 0
        throttle_pauses = backoff(self.backoff, self.max_backoff)
        fault_pauses = backoff(self.fault_pause)
        while True:
            try:
                return self._once(method, url, data)
            except urllib.error.HTTPError as exc:
                status = exc.code
                text = _read_error_body(exc)
                if status == 401:
                    raise ChargifyAuthError(
                        f"Chargify at {self.base_url} rejected CHARGIFY_API_KEY "
                        f"(401 {text or 'Unauthorized'}): set the site's API key"
                    ) from None
                if status == 429 and throttled < self.retries:
                    pause = next(throttle_pauses)
                    delay = _retry_after(exc) or pause
                    throttled += 1
                    log.warning(
                        "chargify throttled (429) %s %s; retrying in %.1fs", method, path, delay
                    )
                    self._sleep(delay)
                    continue
                retry = method in _IDEMPOTENT and faults < self.fault_retries
                if status in _RETRY_STATUSES and retry:
                    self._sleep(next(fault_pauses))
                    faults += 1
                    continue
                if status == 429 or status >= 500:
                    raise ChargifyUnavailable(
                        f"Chargify at {self.base_url} answered {status} to {method} {path}"
                        + (" after every retry" if status == 429 or faults else "")
                        + (f": {text[:200]}" if text else "")
                    ) from None
                errors = _errors(text)
                raise ChargifyApiError(
                    f"Chargify refused {method} {path} ({status}): "
                    + ("; ".join(errors) or text[:200] or "no reason given"),
                    status=status,
                    errors=errors,
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                if method in _IDEMPOTENT and faults < self.fault_retries:
                    self._sleep(next(fault_pauses))
                    faults += 1
                    continue
                raise ChargifyUnavailable(
                    f"Chargify at {self.base_url} is unreachable ({reason})"
                ) from None

    def _once(self, method: str, url: str, data: bytes | None) -> Any:
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", self._auth)
        request.add_header("Accept", "application/json")
        if data is not None:
            # Without it Chargify may take the request for a forgery (§1.3).
            request.add_header("Content-Type", "application/json")
        self.requests += 1
        with _OPENER.open(request, timeout=self.timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Chargify's API does not redirect; following one would carry the key (in the
    ``Authorization`` header) to wherever it points. A 3xx is answered as an error."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _read_error_body(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    """``Retry-After`` in seconds, if Chargify sent one (undocumented, §1.5)."""
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _errors(text: str) -> list[str]:
    """Chargify's ``errors`` in any of its shapes (list, map of lists, string; §1.6)."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return []
    found = parsed.get("errors", parsed.get("error")) if isinstance(parsed, dict) else None
    if isinstance(found, str):
        return [found]
    if isinstance(found, list):
        return [str(e) for e in found]
    if isinstance(found, dict):
        return [f"{k}: {m}" for k, v in found.items() for m in (v if isinstance(v, list) else [v])]
    return []
