"""``chargify-stream``: the one command for every stage and operator task.

Each subcommand reads the settings once (from the environment), then hands them to the
stage or tool it runs. A failure prints why on stderr and exits non-zero: 2 for a usage
or configuration error, 1 for anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chargify_stream.base.errors import ChargifyStreamError, ConfigError
from chargify_stream.base.logs import setup_logging
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.schemas.errors import RecordError

log = logging.getLogger("chargify_stream")

Handler = Callable[[argparse.Namespace, Settings], int]

# The commands that talk to Kafka: their credentials are checked before they start.
KAFKA_COMMANDS = frozenset(
    {"gateway", "processor", "sink", "dlq", "tail", "reconcile", "trace", "console"}
)


def _gateway(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream.ingest.server import run

    return run(settings)


def _processor(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream.processors.worker import run

    return run(settings)


def _sink(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream.sink.consumer import run

    return run(settings)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream.local.up import run

    return run(settings, data_dir=args.data_dir, fresh=args.fresh)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream.sink.migrate import migrate

    applied = migrate(settings.database_dsn())
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def _config(args: argparse.Namespace, settings: Settings) -> int:
    values = settings.masked()
    if args.json:
        print(json.dumps(values, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in values)
        for key, value in sorted(values.items()):
            print(f"{key.upper():<{width}}  {value}")
    return 0


def _sign(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream.ingest.signature import sign

    keys = settings.shared_keys
    local_key = Path(args.data_dir) / "shared-key"
    if not keys and local_key.exists():
        keys = (local_key.read_text().strip().encode(),)
    if not keys:
        raise ConfigError(
            "CHARGIFY_SHARED_KEYS is empty and `up` has made no local key: nothing to sign with"
        )
    body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    print(sign(keys[0], body))
    return 0


def _admin(entity: str, action: str) -> Handler:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from chargify_stream.sink import admin

        return admin.run(entity, action, args, settings)

    return run


def _dlq(action: str) -> Handler:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from chargify_stream import dlq

        return dlq.run(action, args, settings)

    return run


def _trace(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream.trace import run

    return run(args.webhook_id, settings, as_json=args.json)


def _console(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream.console.app import run

    return run(settings)


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream import reconcile

    return reconcile.run(args, settings)


def _connect(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream import connect

    return connect.run(args, settings)


def _tail(args: argparse.Namespace, settings: Settings) -> int:
    from chargify_stream.tail import run

    return run(args, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chargify-stream",
        description="Chargify (Maxio) webhooks to partner-attributed payments and "
        "subscriptions, through Kafka into Postgres. Configuration comes from the "
        "environment (see `chargify-stream config`).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Handler, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    add("gateway", _gateway, "run the HTTP gateway that receives Chargify webhooks")
    add("processor", _processor, "run a processor worker (Faust) over the raw webhook topic")
    add("sink", _sink, "run a sink that writes transactions and subscriptions to Postgres")
    up = add("up", _up, "start local Kafka and Postgres plus every stage, for a laptop")
    up.add_argument(
        "--data-dir", default=".local/up", help="where the local services keep their data"
    )
    up.add_argument("--fresh", action="store_true", help="delete the local data first")
    add("migrate", _migrate, "create or upgrade the Postgres schema")
    cfg = add("config", _config, "print the effective settings, secrets masked")
    cfg.add_argument("--json", action="store_true", help="print JSON")
    sign = add("sign", _sign, "print the Chargify HMAC-SHA256 signature of a body file")
    sign.add_argument("file", help="the raw body, or - for standard input")
    sign.add_argument(
        "--data-dir", default=".local/up", help="where `up` keeps its local shared key"
    )

    trace = add("trace", _trace, "show what happened to one webhook, stage by stage")
    trace.add_argument("webhook_id", metavar="WEBHOOK_ID", help="Chargify's webhook id")
    trace.add_argument("--json", action="store_true", help="print JSON")

    add("console", _console, "serve the operators' web page (CONSOLE_HOST:CONSOLE_PORT)")

    from chargify_stream.sink.admin import add_arguments

    for entity, key_help in (
        ("partners", "partner key"),
        ("customers", "customer key (= the Chargify customer reference)"),
        ("plans", "plan key (= the Chargify product id)"),
    ):
        group = sub.add_parser(entity, help=f"add or list {entity}")
        actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
        add_p = add("add", _admin(entity, "add"), f"add one of the {entity}", actions)
        add_p.add_argument("key", help=key_help)
        add_arguments(entity, add_p)
        list_p = add("list", _admin(entity, "list"), f"list the {entity}", actions)
        list_p.add_argument("--json", action="store_true", help="print JSON")

    from chargify_stream.dlq import add_arguments as add_dlq_arguments

    dlq = sub.add_parser("dlq", help="list, count and replay dead-lettered events")
    dlq_actions = dlq.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_ in (
        ("list", "show each dead-lettered event once, with its latest failure"),
        ("stats", "count dead-lettered events by reason and stage; the oldest one's age"),
        ("replay", "re-publish dead-lettered events to the topic they failed on"),
    ):
        add_dlq_arguments(action, add(action, _dlq(action), help_, dlq_actions))

    from chargify_stream.connect import add_arguments as add_connect_arguments
    from chargify_stream.reconcile import add_arguments as add_reconcile_arguments

    add_reconcile_arguments(
        add(
            "reconcile",
            _reconcile,
            "compare Chargify's webhook log with what the pipeline received, and have "
            "Chargify replay what is missing",
        )
    )
    add_connect_arguments(
        add(
            "connect",
            _connect,
            "switch on the site's webhooks and create or update the Chargify endpoint for "
            "URL, subscribed to exactly the events this pipeline acts on",
        )
    )

    from chargify_stream.tail import add_arguments as add_tail_arguments

    add_tail_arguments(
        add("tail", _tail, "print a topic's decoded records as JSON lines or a table")
    )
    return parser


def _dump_stacks_on_sigquit() -> None:
    """``kill -QUIT <pid>`` prints every thread's stack to stderr and the stage carries
    on: for a stage that does not answer, even one whose event loop is stuck."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # stderr is no file
        faulthandler.register(signal.SIGQUIT, all_threads=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings.log_level, settings.log_format)
        _dump_stacks_on_sigquit()
        if args.command in KAFKA_COMMANDS:
            from chargify_stream.base.kafka_config import check_credentials

            check_credentials(settings)
        code: int = args.handler(args, settings)
        return code
    except ConfigError as exc:
        print(f"chargify-stream: {exc}", file=sys.stderr)
        return 2
    except (ChargifyStreamError, RecordError) as exc:
        print(f"chargify-stream: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0  # the reader (e.g. `| head`) went away: not our failure
    except OSError as exc:
        print(f"chargify-stream: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
