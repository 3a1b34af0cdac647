-- Named queries of the PostgreSQL broker; {schema} is the broker's schema, quoted. Parameters
-- are named, %(name)s; the broker numbers them for asyncpg ($1, $2...) when it loads them.
-- asyncpg sends each parameter in the type the server infers for it: cast where that is not
-- the type of the value.

-- name: create_schema
-- The schema and the table recording applied migrations.
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.migrations (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: lock
-- Wait for a transaction-level advisory lock.
SELECT pg_advisory_xact_lock(%(key)s)

-- name: try_lock
-- Take a transaction-level advisory lock if nobody holds it.
SELECT pg_try_advisory_xact_lock(%(key)s)

-- name: applied_migrations
-- The migrations applied so far.
SELECT name FROM {schema}.migrations

-- name: record_migration
-- Record a migration as applied.
INSERT INTO {schema}.migrations (name) VALUES (%(name)s)

-- name: publish
-- Store a batch of events in order under the publishing lock and notify (0004_plain_publish.sql);
-- the stored delivery ids.
SELECT stored_topic, stored_delivery_id FROM {schema}.publish(
    %(key)s::bigint, %(channel)s, %(message)s,
    %(ids)s::text[], %(topics)s::text[], %(targets)s::text[], %(delivery_ids)s::text[],
    %(times)s::bigint[], %(payloads)s::text[], %(metadatas)s::text[]
)

-- name: notify
-- Tell every instance what was stored (delivered at commit).
SELECT pg_notify(%(channel)s, %(message)s)

-- name: insert_dead_letter
-- Keep a dead letter of a subscription.
INSERT INTO {schema}.dead_letters (subscription, id, topic, time_us, payload, metadata)
VALUES (%(subscription)s, %(id)s, %(topic)s, %(time_us)s, %(payload)s, %(metadata)s)

-- name: subscription_exists
-- Whether a subscription exists.
SELECT 1 FROM {schema}.subscriptions WHERE name = %(name)s

-- name: join
-- Create a subscription at its start, or point an existing one at new topics; created? An
-- owner is recorded on a new subscription and on one without an owner, never replacing one.
INSERT INTO {schema}.subscriptions AS s (name, topics, regexes, position, owner)
VALUES (
    %(name)s, %(topics)s, %(regexes)s,
    CASE
        WHEN %(start)s::text = 'beginning' THEN 0
        WHEN %(since)s::timestamptz IS NOT NULL THEN coalesce(
            (SELECT min(seq) - 1 FROM {schema}.events WHERE stored_at >= %(since)s::timestamptz),
            (SELECT coalesce(max(seq), 0) FROM {schema}.events))
        ELSE (SELECT coalesce(max(seq), 0) FROM {schema}.events)
    END,
    %(owner)s::text
)
ON CONFLICT (name) DO UPDATE
    SET topics = excluded.topics, regexes = excluded.regexes, updated_at = now(),
        owner = coalesce(s.owner, excluded.owner)
    WHERE s.topics IS DISTINCT FROM excluded.topics
       OR (s.owner IS NULL AND excluded.owner IS NOT NULL)
RETURNING (xmax = 0) AS created

-- name: claim
-- Lease up to a limit of the group's events to a consumer: handed back first, then new ones
-- (0003_leased_batches.sql).
SELECT r_seq, r_attempt, r_id, r_topic, r_time_us, r_payload, r_metadata
FROM {schema}.claim(%(group)s, %(consumer)s, %(limit)s::integer, %(lease)s::float8)

-- name: ack
-- Delete the leases still held by the consumers acknowledging them (0003_leased_batches.sql);
-- the positions (from 1) of the acknowledgements that found no lease held, usually none.
WITH held AS (
    SELECT r_subscription, r_seq, r_consumer
    FROM {schema}.ack(%(groups)s::text[], %(seqs)s::bigint[], %(consumers)s::text[])
)
SELECT a.n
FROM unnest(%(groups)s::text[], %(seqs)s::bigint[], %(consumers)s::text[])
    WITH ORDINALITY AS a (g, s, c, n)
WHERE NOT EXISTS (
    SELECT 1 FROM held AS h WHERE h.r_subscription = a.g AND h.r_seq = a.s AND h.r_consumer = a.c
)

-- name: release
-- Hand every lease and leased batch of a consumer back to its group; how many there were.
WITH batches AS (
    UPDATE {schema}.leased_batches SET consumer = NULL, expires_at = '-infinity'
    WHERE subscription = %(group)s AND consumer = %(consumer)s
    RETURNING 1
), singles AS (
    UPDATE {schema}.leases SET consumer = NULL, expires_at = '-infinity'
    WHERE subscription = %(group)s AND consumer = %(consumer)s
    RETURNING 1
)
SELECT (SELECT count(*) FROM batches) + (SELECT count(*) FROM singles)

-- name: release_some
-- Hand some leases of a consumer back to its group; how many there were. Those still in a
-- leased batch leave it for single leases handed back (their first attempt), as when the batch
-- is split.
WITH hit AS (
    SELECT b.first_seq,
        ARRAY(SELECT p FROM unnest(b.pending) AS p WHERE p = ANY(%(seqs)s::bigint[])) AS back
    FROM {schema}.leased_batches AS b
    WHERE b.subscription = %(group)s AND b.consumer = %(consumer)s
      AND b.pending && %(seqs)s::bigint[]
    ORDER BY b.first_seq
    FOR UPDATE
), shrunk AS (
    UPDATE {schema}.leased_batches AS b
    SET pending = ARRAY(SELECT p FROM unnest(b.pending) AS p WHERE p <> ALL(hit.back))
    FROM hit
    WHERE b.subscription = %(group)s AND b.first_seq = hit.first_seq
    RETURNING hit.back
), split AS (
    INSERT INTO {schema}.leases (subscription, seq, consumer, expires_at, attempt)
    SELECT %(group)s::text, p.seq, NULL::text, '-infinity'::timestamptz, 1
    FROM shrunk, unnest(shrunk.back) AS p (seq)
    RETURNING 1
), singles AS (
    UPDATE {schema}.leases SET consumer = NULL, expires_at = '-infinity'
    WHERE subscription = %(group)s AND consumer = %(consumer)s
      AND seq = ANY(%(seqs)s::bigint[])
    RETURNING 1
)
SELECT (SELECT count(*) FROM split) + (SELECT count(*) FROM singles)

-- name: renew
-- Push the deadline of every lease and leased batch held by live consumers. Any other ending
-- more than a lease from now was written before the server's clock moved back: it is brought
-- back to a lease from now, so that it runs out within a lease if nobody renews it, rather than
-- after as long as the clock was off.
WITH batches AS (
    UPDATE {schema}.leased_batches SET expires_at = now() + make_interval(secs => %(lease)s)
    WHERE consumer = ANY(%(consumers)s) OR expires_at > now() + make_interval(secs => %(lease)s)
)
UPDATE {schema}.leases SET expires_at = now() + make_interval(secs => %(lease)s)
WHERE consumer = ANY(%(consumers)s) OR expires_at > now() + make_interval(secs => %(lease)s)

-- name: dead_letters
-- A subscription's dead letters, oldest first, all or those with the given ids.
SELECT seq, id, topic, time_us, payload, metadata FROM {schema}.dead_letters
WHERE subscription = %(subscription)s
  AND (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s::text[]))
ORDER BY seq LIMIT %(limit)s

-- name: delete_dead_letters
-- Take dead letters away by seq.
DELETE FROM {schema}.dead_letters WHERE seq = ANY(%(seqs)s)

-- name: delete_subscription
-- Forget a subscription (first of two statements, in one transaction); how many rows went.
-- Deleting its row waits for a claim of the group in progress to commit.
DELETE FROM {schema}.subscriptions WHERE name = %(name)s

-- name: delete_subscription_state
-- Then its leases, leased batches and dead letters, with a snapshot taken after that claim's
-- commit, so what it leased goes too; how many dead letters went.
WITH leases AS (
    DELETE FROM {schema}.leases WHERE subscription = %(name)s
), batches AS (
    DELETE FROM {schema}.leased_batches WHERE subscription = %(name)s
), letters AS (
    DELETE FROM {schema}.dead_letters WHERE subscription = %(name)s RETURNING 1
)
SELECT count(*) FROM letters

-- name: subscriptions
-- Every subscription with its position, leases in flight, leases handed back or run out (both
-- waiting to be claimed again), and its owner; what waits after the position is counted apart
-- (brokers/sql/backlog.py).
SELECT s.name, s.topics, s.position, s.lost, s.owner,
    (SELECT count(*) FROM {schema}.leases AS l
     WHERE l.subscription = s.name AND l.consumer IS NOT NULL AND l.expires_at > now())
    + (SELECT coalesce(sum(cardinality(b.pending)), 0) FROM {schema}.leased_batches AS b
       WHERE b.subscription = s.name AND b.consumer IS NOT NULL AND b.expires_at > now()),
    (SELECT count(*) FROM {schema}.leases AS l
     WHERE l.subscription = s.name AND (l.consumer IS NULL OR l.expires_at <= now()))
    + (SELECT coalesce(sum(cardinality(b.pending)), 0) FROM {schema}.leased_batches AS b
       WHERE b.subscription = s.name AND (b.consumer IS NULL OR b.expires_at <= now()))
FROM {schema}.subscriptions AS s ORDER BY s.name

-- name: due
-- Every subscription, and whether events of it wait to be claimed again: leases handed back or
-- run out (by leases_due), or a leased batch run out with events not acknowledged.
SELECT s.name,
    EXISTS (SELECT 1 FROM {schema}.leases AS l
            WHERE l.subscription = s.name AND l.expires_at <= now())
    OR EXISTS (SELECT 1 FROM {schema}.leased_batches AS b
               WHERE b.subscription = s.name AND b.expires_at <= now() AND b.pending <> '{}')
FROM {schema}.subscriptions AS s

-- name: expire_range
-- Where a retention pass deletes, without reading the events it keeps: the newest events older
-- than the maximum and the minimum age (each one step down the stored_at index, the last of the
-- events stored at that moment: stored_at grows with seq, nearly) and the edge of the newest
-- events kept by count (0 for each one missing).
SELECT
    coalesce((SELECT seq FROM {schema}.events
              WHERE stored_at < now() - make_interval(secs => %(max_age)s)
              ORDER BY stored_at DESC, seq DESC LIMIT 1), 0),
    coalesce((SELECT seq FROM {schema}.events
              WHERE stored_at < now() - make_interval(secs => %(min_age)s)
              ORDER BY stored_at DESC, seq DESC LIMIT 1), 0),
    coalesce((SELECT seq FROM {schema}.events ORDER BY seq DESC LIMIT 1 OFFSET %(max_count)s), 0)

-- name: expire_window
-- The end of a retention batch: the seq of the %(skip)s + 1th event after %(after)s (NULL when
-- fewer are left), so that a batch reads at most a batch of the primary key.
SELECT seq FROM {schema}.events WHERE seq > %(after)s ORDER BY seq LIMIT 1 OFFSET %(skip)s

-- name: expire
-- Delete a batch of a retention pass: the events after %(after)s up to %(upto)s (a range of the
-- primary key) older than the maximum age, or up to the count edge and older than the minimum
-- age. Every event's age is checked: stored_at only nearly grows with seq.
WITH doomed AS (
    SELECT seq FROM {schema}.events
    WHERE seq > %(after)s AND seq <= %(upto)s
      AND (stored_at < now() - make_interval(secs => %(max_age)s)
           OR (seq <= %(edge)s AND stored_at < now() - make_interval(secs => %(min_age)s)))
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.events AS e USING doomed WHERE e.seq = doomed.seq
RETURNING e.seq, e.topic, e.target

-- name: behind_positions
-- The topics and position of the subscriptions that had not received every event up to a seq,
-- to account for what retention deletes.
SELECT name, topics, position FROM {schema}.subscriptions WHERE position < %(last)s

-- name: split_batches
-- Turn the leased batches holding events up to a seq into single leases, held as before (so
-- that drop_leases sees each event).
WITH split AS (
    DELETE FROM {schema}.leased_batches
    WHERE (subscription, first_seq) IN (
        -- Locked in key order, as acknowledgements lock them: no deadlock between the two.
        SELECT subscription, first_seq FROM {schema}.leased_batches
        WHERE first_seq <= %(upto)s
        ORDER BY subscription, first_seq
        FOR UPDATE
    )
    RETURNING subscription, consumer, expires_at, pending
)
INSERT INTO {schema}.leases (subscription, seq, consumer, expires_at, attempt)
SELECT split.subscription, p.seq, split.consumer, split.expires_at, 1
FROM split, unnest(split.pending) AS p (seq)

-- name: drop_leases
-- Delete leases whose event is gone, up to a seq.
DELETE FROM {schema}.leases AS l
WHERE l.seq <= %(upto)s AND NOT EXISTS (SELECT 1 FROM {schema}.events AS e WHERE e.seq = l.seq)
RETURNING l.subscription

-- name: add_lost
-- Count events a subscription lost to retention.
UPDATE {schema}.subscriptions SET lost = lost + %(lost)s, updated_at = now() WHERE name = %(name)s

-- name: seq_bounds
-- The newest stored seq (0: none) and the oldest (NULL: none), each from one end of the key.
SELECT coalesce((SELECT max(seq) FROM {schema}.events), 0)::bigint,
       (SELECT min(seq) FROM {schema}.events)::bigint

-- name: tally_events
-- Events in a seq range, counted by bucket of seqs, topic and target (a range scan of the key).
SELECT (seq - 1) / %(bucket)s::bigint, topic, target, count(*) FROM {schema}.events
WHERE seq > %(after)s::bigint AND seq <= %(upto)s::bigint
GROUP BY 1, 2, 3

-- name: events_between
-- Events in a seq range, one by one, in seq order (a range scan of the key).
SELECT seq, topic, target FROM {schema}.events
WHERE seq > %(after)s::bigint AND seq <= %(upto)s::bigint ORDER BY seq

-- name: first_stored_since
-- The seq of the first event stored at or after a moment (one step down the stored_at index).
SELECT seq FROM {schema}.events WHERE stored_at >= %(since)s ORDER BY stored_at, seq LIMIT 1

-- name: last_stored_before
-- The seq of the last event stored before a moment (one step down the stored_at index).
SELECT seq FROM {schema}.events WHERE stored_at < %(until)s
ORDER BY stored_at DESC, seq DESC LIMIT 1

-- name: find_events
-- A page of stored events, newest first, between two seqs (a backward walk of the primary key:
-- stored_at is compared through an expression, which keeps the planner off its index), of the
-- exact topics or those the regular expressions match; every topic with neither.
SELECT seq, id, topic, target, time_us, stored_at, payload, metadata
FROM {schema}.events
WHERE seq < %(before)s AND seq >= %(low)s
  AND (%(since)s::timestamptz IS NULL OR stored_at + interval '0 s' >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR stored_at + interval '0 s' < %(until)s)
  AND (%(every)s::boolean OR topic = ANY(%(exact)s::text[]) OR topic ~ ANY(%(regexes)s::text[]))
ORDER BY seq DESC LIMIT %(limit)s

-- name: events_with_id
-- The stored events with an id, newest first (the events_id index).
SELECT seq, id, topic, target, time_us, stored_at, payload, metadata
FROM {schema}.events WHERE id = %(id)s ORDER BY seq DESC

-- name: find_dead_letters
-- A page of dead letters, newest first, of the subscriptions whose dead-letter topic the
-- patterns match, all or the one with an id.
SELECT seq, subscription, id, topic, time_us, payload, metadata FROM {schema}.dead_letters
WHERE seq < %(before)s AND seq >= %(after)s AND time_us >= %(since_us)s AND time_us < %(until_us)s
  AND (%(id)s::text IS NULL OR id = %(id)s)
  AND (topic = ANY(%(exact)s::text[]) OR topic ~ ANY(%(regexes)s::text[]))
ORDER BY seq DESC LIMIT %(limit)s

-- name: subscription_origins
-- Every subscription's topics, position and when it was made.
SELECT name, topics, position, created_at FROM {schema}.subscriptions

-- name: leases_of
-- The leases of one event in some subscriptions: single leases by their key, then the batch
-- holding it (the subscription's newest batch starting at or before it), with whether a live
-- consumer holds it, by the server's clock.
SELECT l.subscription, l.consumer, l.expires_at, l.attempt,
       l.consumer IS NOT NULL AND l.expires_at > now()
FROM {schema}.leases AS l
WHERE l.subscription = ANY(%(groups)s::text[]) AND l.seq = %(seq)s
UNION ALL
SELECT g.name, b.consumer, b.expires_at, 1, b.consumer IS NOT NULL AND b.expires_at > now()
FROM unnest(%(groups)s::text[]) AS g (name)
CROSS JOIN LATERAL (
    SELECT consumer, expires_at, pending FROM {schema}.leased_batches
    WHERE subscription = g.name AND first_seq <= %(seq)s
    ORDER BY first_seq DESC LIMIT 1
) AS b
WHERE %(seq)s = ANY(b.pending)

-- name: dead_letters_naming
-- The dead letters that name an event id (the original event's, in their metadata).
SELECT subscription, id, topic, time_us, payload, metadata FROM {schema}.dead_letters
WHERE metadata::jsonb ->> 'callboard-event-id' = %(id)s ORDER BY seq
