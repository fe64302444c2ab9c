"""The console's HTML: one server-rendered page of the summary, and a trace page.

Plain HTML and a little CSS, no script: what the page shows is what the server computed,
and every figure carries a ``data-figure`` attribute naming it, for tests and for anyone
scraping the page. Every value is escaped.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from chargify_stream.console.summary import AGE_BUCKETS
from chargify_stream.dlq.report import format_age
from chargify_stream.trace import plain

__all__ = ["plain", "render_summary", "render_trace"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#176f2c;font-weight:600}.down{color:#b00020;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:2em}.muted{color:#777}.err{color:#b00020}
form{margin:.6em 0}input[type=text]{width:16em;padding:3px}pre{background:#fff;padding:1em;
border:1px solid #ddd;overflow:auto}
"""


def _n(value: Any, figure: str) -> str:
    return f'<td class="n" data-figure="{escape(figure)}">{escape(str(value))}</td>'


def _table(head: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table><tr>{th}</tr>{''.join(rows)}</table>"


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _search(value: str = "") -> str:
    return (
        '<form action="/trace" method="get"><label>Webhook id <input type="text"'
        f' name="webhook_id" value="{escape(value)}" inputmode="numeric"></label>'
        " <button type=submit>Trace</button></form>"
    )


def render_summary(s: dict[str, Any]) -> str:
    """The console page for a :func:`chargify_stream.console.summary.gather` result."""
    parts = [
        "<h1>chargify-stream</h1>",
        f'<p class="muted">as of {escape(plain(s["generated_at"]))}'
        ' &middot; <a href="/api/summary">JSON</a></p>',
        _search(),
    ]
    for name, error in s["errors"].items():
        parts.append(
            f'<p class="err" data-error="{escape(name)}">{escape(name)}: {escape(error)}</p>'
        )

    stages = [
        f'<tr><td>{escape(st["stage"])}</td><td class="{"up" if st["up"] else "down"}"'
        f' data-figure="stage.{escape(st["stage"])}">{"up" if st["up"] else "down"}</td>'
        f'<td class="muted">{escape(str(st["status"]))} {escape(st["url"])}</td></tr>'
        for st in s["stages"]
    ]
    outcomes = s.get("outcomes", {})
    outcome_rows = [
        f"<tr><td>{escape(k)}</td>{_n(v, f'outcome.{k}')}</tr>" for k, v in sorted(outcomes.items())
    ]
    throughput = [
        f"<tr><td>last {escape(w)}</td>{_n(t['received_per_s'], f'received_per_s.{w}')}"
        f"{_n(t['decided_per_s'], f'decided_per_s.{w}')}</tr>"
        for w, t in s.get("throughput", {}).items()
    ]
    parts.append('<div class="grid"><div><h2>Stages</h2>')
    parts.append(_table(["stage", "health", "endpoint"], stages, "no stages"))
    parts.append("<h2>Throughput (webhooks/s)</h2>")
    parts.append(_table(["window", "received", "decided"], throughput, "no data"))
    parts.append("</div><div><h2>Outcomes</h2>")
    parts.append(_table(["outcome", "webhooks"], outcome_rows, "no webhooks yet"))
    match = s.get("matching")
    if match:
        rate = "-" if match["matched_rate"] is None else f"{match['matched_rate'] * 100:.1f} %"
        parts.append(
            "<h2>Customer matching (payments and refunds, 24 h)</h2><table>"
            f"<tr><td>matched</td>{_n(match['matched'], 'matching.matched')}</tr>"
            f"<tr><td>unmatched (parked)</td>{_n(match['unmatched'], 'matching.unmatched')}</tr>"
            f"<tr><td>matched rate</td>{_n(rate, 'matching.rate')}</tr></table>"
        )
    parts.append("</div></div>")

    dead = [
        f"<tr><td>{escape(reason)}</td><td>{escape(d['outcome'])}</td>"
        f"{_n(d['total'], f'dead.{reason}')}"
        + "".join(_n(d["ages"][b], f"dead.{reason}.{b}") for b in AGE_BUCKETS)
        + f"{_n(format_age(d['oldest_s']), f'dead.{reason}.oldest')}</tr>"
        for reason, d in sorted(s.get("dead_letters", {}).items())
    ]
    parts.append("<h2>Dead letters not yet resolved, by reason and age</h2>")
    parts.append(
        _table(["reason", "outcome", "webhooks", *AGE_BUCKETS, "oldest"], dead, "none: all clear")
    )
    parked = s.get("parked")
    if parked:
        parts.append(
            "<h2>Parked events waiting for their customer</h2><table>"
            f"<tr><td>waiting</td>{_n(parked['waiting'], 'parked.waiting')}</tr>"
            f"<tr><td>oldest</td>{_n(format_age(parked['oldest_s']), 'parked.oldest')}</tr></table>"
        )
    lag = [_lag_row(r) for r in s["consumer_lag"]]
    parts.append("<h2>Consumer lag</h2>")
    parts.append(
        _table(["group", "topic", "partition", "committed", "end", "lag"], lag, "no groups")
    )
    recent = [_transaction_row(t) for t in s.get("recent_transactions", [])]
    parts.append("<h2>Recent transactions</h2>")
    parts.append(
        _table(
            ["webhook", "transaction", "kind", "amount", "customer", "partner", "occurred"],
            recent,
            "none yet",
        )
    )
    return _page("chargify-stream console", "".join(parts))


def _lag_row(r: dict[str, Any]) -> str:
    committed = "-" if r["committed"] is None else r["committed"]
    where = f"{r['group']}.{r['topic']}.{r['partition']}"
    return (
        f"<tr><td>{escape(r['group'])}</td><td>{escape(r['topic'])}</td>"
        f"{_n(r['partition'], 'partition')}{_n(committed, f'committed.{where}')}"
        f"{_n(r['end'], f'end.{where}')}{_n(r['lag'], f'lag.{where}')}</tr>"
    )


def _transaction_row(t: dict[str, Any]) -> str:
    amount = f"{t['amount_cents'] / 100:.2f} {t['currency'] or ''}".strip()
    partner = t["partner_key"] or "none"
    return (
        f'<tr><td><a href="/trace?webhook_id={t["webhook_id"]}">{t["webhook_id"]}</a></td>'
        f"{_n(t['transaction_id'], 'transaction')}<td>{escape(t['kind'])}</td>"
        f"{_n(amount, 'amount')}<td>{escape(t['customer_key'])}</td>"
        f'<td data-figure="partner.{t["transaction_id"]}">{escape(partner)}</td>'
        f'<td class="muted">{escape(plain(t["occurred_at"]))}</td></tr>'
    )


def render_trace(webhook_id: str, text: str | None, trace: dict[str, Any] | None) -> str:
    """A webhook's trace (the ``trace`` command's report), or why there is none."""
    body = ['<p><a href="/">&larr; console</a></p>', _search(webhook_id)]
    if trace is None:
        body.append(f'<p class="err" data-figure="trace.error">{escape(text or "")}</p>')
    else:
        o = trace["outcome"]
        body.append(
            f"<h1>Webhook {escape(webhook_id)}: "
            f'<span data-figure="trace.outcome">{escape(o["outcome"])}</span></h1>'
        )
        body.append(f"<pre>{escape(text or '')}</pre>")
        body.append("<details><summary>JSON</summary><pre>")
        body.append(escape(json.dumps(trace, default=plain, indent=2)))
        body.append("</pre></details>")
    return _page(f"webhook {webhook_id}", "".join(body))
