"""The shared base: what every stage and command stands on.

Exceptions (:mod:`.errors`), settings (:mod:`.settings`), the record size budget
(:mod:`.limits`), logging (:mod:`.logs`), how a Kafka client connects (:mod:`.kafka_config`),
what a Kafka error means (:mod:`.kafka_errors`), the pipeline's topics (:mod:`.kafka_admin`),
consumed records and reading a topic to its end (:mod:`.messages`), retry with backoff
(:mod:`.retry`) and publish-and-wait for the broker's answer (:mod:`.delivery`).

These modules import only each other (``tests/unit/test_layers.py``): never a contract, a
stage or a command.
"""
