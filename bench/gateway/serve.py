"""Serve the gateway app for the benchmark: with its real Kafka publisher, or with a sink
that answers at once (the no-publish baseline), under uvicorn or granian.

``--sink kafka --server uvicorn`` is exactly what ``chargify-stream gateway`` runs
(``ingest.server.build_app`` served with ``ingest.server.uvicorn_config``). Settings come
from the environment, as for the real command. ``--server granian`` needs
``pip install granian==2.8.7`` in the venv: it is not a dependency, since it lost the
comparison (see bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chargify_stream.base.logs import setup_logging
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.ingest.app import GatewayApp
from chargify_stream.ingest.publisher import Headers
from chargify_stream.ingest.server import build_app, uvicorn_config


class NullSink:
    """Takes every record and acknowledges it at once: the gateway minus Kafka."""

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> None:
        return None

    async def ready(self, topic: str) -> bool:
        return True


def make_app(settings: Settings | None = None) -> GatewayApp:
    """The app for ``BENCH_SINK`` (``kafka`` or ``none``); a factory, for granian's workers."""
    settings = settings or load_settings()
    sink = NullSink() if os.environ.get("BENCH_SINK") == "none" else None
    return build_app(settings, sink=sink)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sink", choices=["kafka", "none"], default="kafka")
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    args = parser.parse_args()
    os.environ["BENCH_SINK"] = args.sink
    settings = load_settings()
    setup_logging(settings.log_level)
    if args.server == "uvicorn":
        import uvicorn

        uvicorn.Server(uvicorn_config(settings, make_app(settings))).run()
        return 0
    from granian import Granian
    from granian.constants import Interfaces, Loops

    Granian(
        "serve:make_app",
        factory=True,
        working_dir=Path(__file__).resolve().parent,
        address=settings.gateway_host,
        port=settings.gateway_port,
        interface=Interfaces.ASGI,
        workers=1,
        loop=Loops.uvloop,
        log_access=False,
    ).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
