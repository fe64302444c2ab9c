-- What happened to every webhook (DESIGN.md, webhook_outcomes): one row per Chargify
-- webhook id with its latest outcome, and one row per decision a stage took on one of its
-- deliveries (webhook_deliveries), which `trace` shows. Both are written by
-- sink/outcomes.py only: by the sink in the transaction of its upserts, and by the
-- sink's outcome recorder (dead-letter topic, processor decisions).

create table webhook_deliveries (
    webhook_id      bigint      not null,
    -- Who decided: processor, sink.
    stage           text        not null,
    -- duplicate, ignored, dead_lettered, parked, recorded, unchanged.
    decision        text        not null,
    reason          text,
    -- The record the decision is about: the raw record for the processor's own
    -- decisions, the typed or retry record for the sink's, the dead letter.
    topic           text        not null,
    "partition"     integer     not null,
    "offset"        bigint      not null,
    -- The raw record (the delivery from Chargify, or a replay) it traces back to.
    source_topic     text,
    source_partition integer,
    source_offset    bigint,
    replay_count    integer     not null default 0,  -- dlq-replay-count: a replay or re-drive
    at              timestamptz not null,            -- when the stage decided
    event           text,
    received_at     timestamptz,
    transaction_id  bigint,
    subscription_id bigint,
    customer_key    text,
    -- The decision on a delivery into the pipeline (a raw record, a re-drive, a
    -- sink-stage replay): counted in webhook_outcomes.attempts.
    attempt         boolean     not null default false,
    -- One row per record and stage: a stage that reads its input again after a crash
    -- adds nothing (and does not count the attempt twice).
    primary key (webhook_id, stage, topic, "partition", "offset")
);

create table webhook_outcomes (
    webhook_id      bigint      primary key,
    event           text,
    -- recorded, unchanged, ignored, dead_lettered, parked; received while only a
    -- duplicate of it has been recorded (its first delivery's decision is on its way).
    outcome         text        not null,
    reason          text,
    stage           text        not null,
    transaction_id  bigint,
    subscription_id bigint,
    customer_key    text,
    received_at     timestamptz,
    decided_at      timestamptz not null,
    -- Deliveries into the pipeline: Chargify's retries, replays, re-drives.
    attempts        integer     not null default 0,
    constraint webhook_outcomes_outcome_check check (outcome in
        ('received', 'recorded', 'unchanged', 'ignored', 'dead_lettered', 'parked'))
);
-- What the console lists: the webhooks still waiting on an operator (a partial index, so
-- the sink's recorded rows, nearly all, never touch it).
create index webhook_outcomes_unresolved_idx on webhook_outcomes (reason, decided_at)
    where outcome in ('dead_lettered', 'parked');
