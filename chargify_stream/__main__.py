"""``python -m chargify_stream`` is the ``chargify-stream`` command."""

import sys

from chargify_stream.cli import main

sys.exit(main())
