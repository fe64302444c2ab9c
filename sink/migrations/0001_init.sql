-- The analysts' and operators' contract (DESIGN.md): partners, customers, plans,
-- subscriptions, transactions. Ids are bigint (real Chargify ids exceed 2^31);
-- timestamps are timestamptz, stored in UTC.

create table partners (
    partner_key text primary key,
    name        text,
    created_at  timestamptz not null default now()
);

create table customers (
    customer_key text primary key,
    partner_key  text references partners (partner_key),
    email        text,
    name         text,
    created_at   timestamptz not null default now()
);
create index customers_partner_idx on customers (partner_key);

create table plans (
    plan_key   text primary key,          -- the Chargify product id, as text
    name       text,
    created_at timestamptz not null default now()
);

create table subscriptions (
    subscription_id     bigint primary key,
    customer_key        text not null references customers (customer_key),
    product_id          bigint,
    product_handle      text,
    plan_key            text references plans (plan_key),
    state               text,
    components          jsonb not null default '{}'::jsonb,   -- component id -> allocated quantity
    component_versions  jsonb not null default '{}'::jsonb,   -- component id -> [event time, webhook id]
    last_webhook_id     bigint not null,
    last_event_at       timestamptz not null,                -- event time of last_webhook_id
    updated_at          timestamptz not null default now()
);
create index subscriptions_customer_idx on subscriptions (customer_key);
create index subscriptions_product_idx on subscriptions (product_id);

create table transactions (
    transaction_id      bigint primary key,
    customer_key        text not null references customers (customer_key),
    partner_key         text references partners (partner_key),
    subscription_id     bigint,
    kind                text not null check (kind in ('payment', 'refund')),
    amount_cents        bigint not null,
    currency            text,
    refunded_payment_id bigint,
    occurred_at         timestamptz not null,
    webhook_id          bigint not null,
    recorded_at         timestamptz not null default now()
);
create index transactions_customer_idx on transactions (customer_key, occurred_at);
create index transactions_partner_idx on transactions (partner_key, occurred_at);
create index transactions_occurred_idx on transactions (occurred_at);
