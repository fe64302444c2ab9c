"""chargify-stream: Chargify webhooks to partner-attributed payments and subscriptions.

This package is the composition root shared by the stages: the settings, the command
line, logging, topic administration and the local services used by ``up`` and the tests.
The stages themselves live in ``ingest``, ``processors`` and ``sink``; the contracts
between them in ``schemas``.
"""
