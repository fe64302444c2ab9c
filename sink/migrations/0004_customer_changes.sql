-- The outbox of the compacted topic chargify.customers (sink/customer_relay.py).
--
-- Every change to a customer, whatever made it (`customers add`, plain SQL, another tool),
-- is recorded here by a trigger, in the transaction that made it: a change that commits is
-- recorded, one that rolls back is not. The relay in each sink process publishes the rows
-- in change_id order and deletes them only after the broker acknowledged them, so every
-- change reaches the topic at least once, in order, across restarts of anything.

create table customer_changes (
    change_id    bigserial primary key,    -- the order the changes are published in
    customer_key text    not null,         -- the record key on chargify.customers
    deleted      boolean not null,         -- true: publish a tombstone (a null value)
    partner_key  text,
    email        text,
    name         text,
    changed_at   timestamptz not null default clock_timestamp()   -- Customer.updated_at
);

-- One row per customer state written; a re-keyed customer is a deletion of the old key
-- and a new state of the new one. Rows of one customer are ordered by change_id: its
-- changes hold its row lock in turn, and each takes its change_id under that lock.
create function record_customer_change() returns trigger
language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        insert into customer_changes (customer_key, deleted) values (old.customer_key, true);
    else
        if tg_op = 'UPDATE' and old.customer_key <> new.customer_key then
            insert into customer_changes (customer_key, deleted)
            values (old.customer_key, true);
        end if;
        insert into customer_changes (customer_key, deleted, partner_key, email, name)
        values (new.customer_key, false, new.partner_key, new.email, new.name);
    end if;
    -- Notifications with the same payload are sent once per transaction.
    perform pg_notify('customer_changed', '');
    return null;
end;
$$;

create trigger customers_record_change
    after insert or delete on customers
    for each row execute function record_customer_change();

create trigger customers_record_update
    after update on customers
    for each row when (old is distinct from new)
    execute function record_customer_change();

-- TRUNCATE fires no row triggers: record a deletion of every customer first.
create function record_customers_truncated() returns trigger
language plpgsql as $$
begin
    insert into customer_changes (customer_key, deleted)
    select customer_key, true from customers order by customer_key;
    perform pg_notify('customer_changed', '');
    return null;
end;
$$;

create trigger customers_record_truncate
    before truncate on customers
    for each statement execute function record_customers_truncated();

-- The customers that exist already: the topic starts as a full copy of the table.
insert into customer_changes (customer_key, deleted, partner_key, email, name)
select customer_key, false, partner_key, email, name from customers order by customer_key;
