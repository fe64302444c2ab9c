"""Kafka header names and dead-letter reason codes: the contract in DESIGN.md."""

from __future__ import annotations

from typing import Final

# Headers on chargify.webhooks.raw, carried over onto the output topics.
WEBHOOK_ID: Final = "chargify-webhook-id"
EVENT: Final = "chargify-event"
RECEIVED_AT: Final = "received-at"
CONTENT_TYPE: Final = "content-type"
SOURCE_IP: Final = "source-ip"
CARRIED_OVER: Final = (WEBHOOK_ID, EVENT, RECEIVED_AT)
# Added by the processor to its typed records: the raw record they came from, as
# ``topic/partition/offset``, so the outcome log can tell which delivery a record was.
RAW_POSITION: Final = "chargify-raw-position"

# Dead-letter headers.
DLQ_REASON: Final = "dlq-reason"
DLQ_STAGE: Final = "dlq-stage"
DLQ_ERROR: Final = "dlq-error"
DLQ_SOURCE_TOPIC: Final = "dlq-source-topic"
DLQ_SOURCE_PARTITION: Final = "dlq-source-partition"
DLQ_SOURCE_OFFSET: Final = "dlq-source-offset"
DLQ_FAILED_AT: Final = "dlq-failed-at"
DLQ_REPLAY_COUNT: Final = "dlq-replay-count"
# Copied onto the output records too when present: a replayed event keeps its count across
# stages, so a failure at the sink counts the attempts the processor already made.
CARRIED_TO_OUTPUTS: Final = (*CARRIED_OVER, DLQ_REPLAY_COUNT)
# Only on a pointer: a dead letter written without its body because it could not be
# written whole; the original stays on dlq-source-topic at dlq-source-offset.
DLQ_POINTER: Final = "dlq-pointer"
DLQ_ORIGINAL_SIZE: Final = "dlq-original-size"
DLQ_HEADERS: Final = (
    DLQ_REASON,
    DLQ_STAGE,
    DLQ_ERROR,
    DLQ_SOURCE_TOPIC,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_OFFSET,
    DLQ_FAILED_AT,
    DLQ_REPLAY_COUNT,
)

# Dead-letter reason codes.
CUSTOMER_NOT_FOUND: Final = "customer_not_found"
MISSING_CUSTOMER_REFERENCE: Final = "missing_customer_reference"
UNKNOWN_SUBSCRIPTION: Final = "unknown_subscription"
MALFORMED_PAYLOAD: Final = "malformed_payload"
UNSUPPORTED_SCHEMA: Final = "unsupported_schema"
REASONS: Final = (
    CUSTOMER_NOT_FOUND,
    MISSING_CUSTOMER_REFERENCE,
    UNKNOWN_SUBSCRIPTION,
    MALFORMED_PAYLOAD,
    UNSUPPORTED_SCHEMA,
)

STAGE_PROCESSOR: Final = "processor"
STAGE_SINK: Final = "sink"
