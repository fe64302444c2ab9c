"""The processor worker without transactions, for ``run.py``'s comparison.

``chargify-stream processor`` with the pipeline's ``transactional=False``: outputs through
an idempotent producer, offsets committed once every output was acknowledged.
"""

from __future__ import annotations

import sys

from chargify_stream.base.logs import setup_logging
from chargify_stream.base.settings import load_settings
from chargify_stream.processors.worker import run

if __name__ == "__main__":
    settings = load_settings()
    setup_logging(settings.log_level)
    sys.exit(run(settings, transactional=False))
