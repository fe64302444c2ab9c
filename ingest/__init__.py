"""The HTTP gateway: verify each Chargify webhook and publish its raw body to Kafka,
answering 200 only once the broker has it."""
