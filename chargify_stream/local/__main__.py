"""``python -m chargify_stream.local fetch``: fetch the Kafka broker jars into the cache."""

from __future__ import annotations

import logging
import sys

from chargify_stream.local.kafka import ensure_kafka_jars


def main(argv: list[str]) -> int:
    if argv != ["fetch"]:
        print("usage: python -m chargify_stream.local fetch", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="==> %(message)s")
    print(f"==> Kafka jars in {ensure_kafka_jars()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
