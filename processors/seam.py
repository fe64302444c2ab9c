"""Every name of faust-streaming and mode-streaming the processor uses, in one place.

The processor uses Faust as its application shell only (see :mod:`processors.worker`);
its Kafka work is done by librdkafka (:mod:`processors.pipeline`). No private name of
faust, mode or aiokafka is used anywhere in the project, and aiokafka is not used at all.
The touchpoints, all public, and why:

- ``faust.App`` with ``App.BootStrategy`` replaced by a subclass of
  ``faust.app.base.BootStrategy`` with ``enable_kafka = False`` (the switch its source
  documents for subclasses): the worker then starts no aiokafka consumer or producer, no
  conductor and no tables; only the web server and sensors. Were that switch to stop
  working, Faust's consumer would join the group ``PROCESSOR_APP_ID`` beside the
  pipeline's consumer and break it (different protocols in one group).
- ``App.page`` and ``faust.web.View``/``Request``/``Response``: the ``/metrics`` page.
- ``faust.Worker(app, *services, loglevel=, quiet=, override_logging=)`` and its
  ``execute_from_commandline()``, which ends with ``SystemExit``: signal handling and a
  graceful stop of the app and of the pipeline's service.
- ``mode.Service`` with ``on_start``/``on_stop``: the pipeline's thread as a service.

``tests/unit/test_seam.py`` pins the versions (faust-streaming 0.15.3, mode-streaming
0.7.1, aiokafka 0.14.0, as ``pyproject.toml``) and the source of ``BootStrategy``, and
fails with instructions when either changes; ``tests/integration/test_seam.py`` runs a
real worker of this app against the real broker and checks the contract above.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.app.base import BootStrategy
from faust.web import Request, Response, View
from mode import Service

__all__ = [
    "App",
    "NoKafka",
    "ProcessorApp",
    "Request",
    "Response",
    "Service",
    "View",
    "Worker",
    "execute",
]

App = faust.App
Worker = faust.Worker


class NoKafka(BootStrategy):
    """Start no Kafka service of Faust's (consumer, producer, conductor, tables)."""

    enable_kafka = False


class ProcessorApp(faust.App):
    """A Faust app whose worker runs no Kafka service of its own."""

    BootStrategy = NoKafka


def execute(worker: Any) -> int:
    """Run ``worker`` until it stops; its exit status."""
    try:
        worker.execute_from_commandline()
    except SystemExit as done:  # how mode's worker always ends
        return done.code if isinstance(done.code, int) else 1
    return 0
