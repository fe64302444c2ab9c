"""Contracts between the stages: Avro schemas and codec, the Chargify form decoder,
Kafka header names and dead-letter reason codes."""
