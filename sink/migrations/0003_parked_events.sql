-- Parked events: the customer_not_found dead letters, indexed so that they re-drive
-- themselves once their customer exists (sink/redrive.py). The dead-letter topic stays the
-- record of truth; this table is an index of it plus "already re-driven" state, so the
-- re-drive survives restarts and is shared by every sink instance.

create table parked_events (
    -- Where the dead letter sits on the dead-letter topic: one row per dead-letter record.
    dlq_topic        text    not null,
    dlq_partition    integer not null,
    dlq_offset       bigint  not null,
    customer_key     text    not null,        -- the record key: the Chargify customer reference
    source_topic     text    not null,        -- dlq-source-topic: where a re-drive publishes
    source_partition integer not null,
    source_offset    bigint  not null,
    record_key       bytea,
    value            bytea   not null,
    -- Every header of the dead letter, byte for byte (originals and dlq-*), in order.
    header_names     text[]  not null,
    header_values    bytea[] not null,
    webhook_id       text,                    -- chargify-webhook-id: one event, many dead letters
    event            text,                    -- chargify-event
    replay_count     integer not null,        -- dlq-replay-count of the dead letter
    failed_at        timestamptz,             -- dlq-failed-at
    parked_at        timestamptz not null default now(),
    redriven_at      timestamptz,             -- set in the transaction that saw the broker ack
    primary key (dlq_topic, dlq_partition, dlq_offset)
);
create index parked_events_waiting_idx on parked_events (customer_key) where redriven_at is null;

-- Any path that creates a customer (`customers add`, a hand-written insert, another tool)
-- wakes the re-drivers; they also poll, so a notification lost while none was listening
-- delays a re-drive by seconds, never loses it.
create function notify_customer_created() returns trigger
language plpgsql as $$
begin
    perform pg_notify('customer_created', new.customer_key);
    return null;
end;
$$;

create trigger customers_notify_created
    after insert or update of customer_key on customers
    for each row execute function notify_customer_created();
