"""The operators' web console: figures from Postgres and Kafka, as HTML and JSON."""
