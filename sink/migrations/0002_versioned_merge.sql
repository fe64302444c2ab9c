-- Set-based subscription upserts (sink/upsert.py).
--
-- A version is a JSON array [event time in microseconds since the Unix epoch, webhook id].
-- Two versions compare as jsonb arrays do: element by element, numerically, so the newer
-- event is the greater array, and any version is greater than '[]' (no version yet).
-- Numbers instead of 0001's [ISO text, webhook id] because ISO text only sorts by time
-- while every stamp is written with the same precision and offset.
--
-- Each subscription field an event can leave out (state, product id, product handle) now
-- carries its own version, as each component allocation already did. The row's newest
-- event (last_event_at, last_webhook_id) still guards the row; the field versions make the
-- result the same whatever order and batching the events arrive in: a field an event does
-- not carry keeps the value of the newest event that did.

alter table subscriptions
    add column field_versions jsonb not null default '{}'::jsonb;  -- field -> version

update subscriptions set
    component_versions = coalesce(
        (select jsonb_object_agg(
                    key,
                    jsonb_build_array(
                        (extract(epoch from (value ->> 0)::timestamptz) * 1000000)::bigint,
                        value -> 1))
           from jsonb_each(component_versions)
          where jsonb_typeof(value -> 0) = 'string'),
        '{}'::jsonb)
        || coalesce(
        (select jsonb_object_agg(key, value)
           from jsonb_each(component_versions)
          where jsonb_typeof(value -> 0) = 'number'),
        '{}'::jsonb),
    field_versions = jsonb_strip_nulls(jsonb_build_object(
        'state', case when state is not null then jsonb_build_array(
            (extract(epoch from last_event_at) * 1000000)::bigint, last_webhook_id) end,
        'product_id', case when product_id is not null then jsonb_build_array(
            (extract(epoch from last_event_at) * 1000000)::bigint, last_webhook_id) end,
        'product_handle', case when product_handle is not null then jsonb_build_array(
            (extract(epoch from last_event_at) * 1000000)::bigint, last_webhook_id) end));

-- Per key, the newer of two version maps.
create function sink_merge_versions(stored jsonb, incoming jsonb) returns jsonb
language sql immutable parallel safe
as $$
    select coalesce(
        jsonb_object_agg(
            key,
            case when s.value is null or i.value > s.value then i.value else s.value end),
        '{}'::jsonb)
      from jsonb_each(stored) s
      full join jsonb_each(incoming) i using (key)
$$;

-- Per key, the value whose version is newer: ``stored`` with every key of ``incoming``
-- whose version is newer than the stored one.
create function sink_merge_values(
    stored jsonb, stored_versions jsonb, incoming jsonb, incoming_versions jsonb
) returns jsonb
language sql immutable parallel safe
as $$
    select stored || coalesce(jsonb_object_agg(i.key, incoming -> i.key), '{}'::jsonb)
      from jsonb_each(incoming_versions) i
     where i.value > coalesce(stored_versions -> i.key, '[]'::jsonb)
$$;

-- Whether any version in ``incoming`` is newer than the stored one for its key.
create function sink_has_newer(stored_versions jsonb, incoming_versions jsonb) returns boolean
language sql immutable parallel safe
as $$
    select exists (
        select 1
          from jsonb_each(incoming_versions) i
         where i.value > coalesce(stored_versions -> i.key, '[]'::jsonb))
$$;

-- Analysts list subscriptions by plan; deleting or re-keying a plan checks this key too.
create index subscriptions_plan_idx on subscriptions (plan_key);

-- Most subscription updates change no indexed column (state, components, versions): room
-- on the page lets Postgres write them as heap-only tuples, without touching the four
-- indexes. Applies to pages written from now on.
alter table subscriptions set (fillfactor = 70);
