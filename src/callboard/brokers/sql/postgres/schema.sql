-- The PostgreSQL broker's schema as the migrations leave it (the reference they are tested
-- against). Create it with `callboard migrate`, which also records the migrations applied.

CREATE TABLE {schema}.events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL,
    topic text NOT NULL,
    target text,
    delivery_id text,
    time_us bigint NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now(),
    payload text NOT NULL,
    metadata text NOT NULL
);

COMMENT ON TABLE {schema}.events IS 'Events published to callboard, in publish order (append-only)';
COMMENT ON COLUMN {schema}.events.target IS 'Set by deliver_to: only this subscription receives the event';
COMMENT ON COLUMN {schema}.events.delivery_id IS 'The provider delivery id; unique per topic while retained';

CREATE UNIQUE INDEX events_delivery_id ON {schema}.events (topic, delivery_id)
    WHERE delivery_id IS NOT NULL;

CREATE INDEX events_stored_at ON {schema}.events (stored_at);

CREATE INDEX events_id ON {schema}.events (id);

CREATE TABLE {schema}.subscriptions (
    name text PRIMARY KEY,
    topics text[] NOT NULL,
    regexes text[] NOT NULL,
    position bigint NOT NULL,
    lost bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    owner text
);

COMMENT ON COLUMN {schema}.subscriptions.position IS 'Every event up to here was handed out';
COMMENT ON COLUMN {schema}.subscriptions.lost IS 'Events retention deleted before the subscription received them';
COMMENT ON COLUMN {schema}.subscriptions.owner IS 'Who may read it over the bus: in-process, service=<subject>, or NULL (not recorded)';

CREATE TABLE {schema}.leases (
    subscription text NOT NULL,
    seq bigint NOT NULL,
    consumer text,
    expires_at timestamptz NOT NULL,
    attempt integer NOT NULL,
    PRIMARY KEY (subscription, seq)
);

COMMENT ON TABLE {schema}.leases IS 'Events handed out and not acknowledged; consumer NULL or expired: back with the group';

CREATE INDEX leases_consumer ON {schema}.leases (consumer);

CREATE INDEX leases_due ON {schema}.leases (subscription, expires_at);

CREATE TABLE {schema}.leased_batches (
    subscription text NOT NULL,
    first_seq bigint NOT NULL,
    consumer text,
    expires_at timestamptz NOT NULL,
    -- The batch's events not acknowledged yet, in seq order; empty: the batch is done.
    pending bigint[] NOT NULL,
    PRIMARY KEY (subscription, first_seq)
);

COMMENT ON TABLE {schema}.leased_batches IS 'Events leased together by one claim (first attempt), until acknowledged or split into leases';

CREATE TABLE {schema}.dead_letters (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription text NOT NULL,
    id text NOT NULL,
    topic text NOT NULL,
    time_us bigint NOT NULL,
    payload text NOT NULL,
    metadata text NOT NULL
);

CREATE INDEX dead_letters_subscription ON {schema}.dead_letters (subscription, seq);

-- The hot operations, one statement each (0002_operations.sql, 0003_leased_batches.sql,
-- 0004_plain_publish.sql).

CREATE FUNCTION {schema}.publish(
    lock_key bigint,
    channel text,
    message text,
    ids text[],
    topics text[],
    targets text[],
    delivery_ids text[],
    times bigint[],
    payloads text[],
    metadatas text[]
) RETURNS TABLE (stored_topic text, stored_delivery_id text)
LANGUAGE plpgsql AS $$
BEGIN
    -- Publishing transactions take turns until their commit, so seqs become visible in the
    -- order they were drawn: a reader that sees seq N sees every seq below it.
    PERFORM pg_advisory_xact_lock(lock_key);
    IF delivery_ids IS NULL THEN
        -- In order; nothing comes back (every event is stored).
        INSERT INTO {schema}.events (id, topic, target, time_us, payload, metadata)
        SELECT b.id, b.topic, b.target, b.time_us, b.payload, b.metadata
        FROM unnest(ids, topics, targets, times, payloads, metadatas)
            WITH ORDINALITY AS b (id, topic, target, time_us, payload, metadata, n)
        ORDER BY b.n;
    ELSE
        -- In order; a known (topic, delivery id) is skipped. Only the stored delivery ids come
        -- back: what is not among them was a redelivery.
        RETURN QUERY
        WITH stored AS (
            INSERT INTO {schema}.events AS e
                (id, topic, target, delivery_id, time_us, payload, metadata)
            SELECT b.id, b.topic, b.target, b.delivery_id, b.time_us, b.payload, b.metadata
            FROM unnest(ids, topics, targets, delivery_ids, times, payloads, metadatas)
                WITH ORDINALITY AS b (id, topic, target, delivery_id, time_us, payload, metadata, n)
            ORDER BY b.n
            ON CONFLICT (topic, delivery_id) WHERE delivery_id IS NOT NULL DO NOTHING
            RETURNING e.topic, e.delivery_id
        )
        SELECT s.topic, s.delivery_id FROM stored AS s WHERE s.delivery_id IS NOT NULL;
    END IF;
    -- Every instance hears what was stored, at the commit.
    PERFORM pg_notify(channel, message);
END
$$;

CREATE FUNCTION {schema}.claim(
    grp text,
    consumer_id text,
    lim integer,
    lease double precision
) RETURNS TABLE (
    r_seq bigint,
    r_attempt integer,
    r_id text,
    r_topic text,
    r_time_us bigint,
    r_payload text,
    r_metadata text
)
LANGUAGE plpgsql
-- Walk the events in seq order from the position and stop at the limit, whatever the statistics
-- say: with a group far behind (or tables never analysed) the planner would rather read every
-- event after the position, match each against the group's patterns and sort them all.
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    pos bigint;
    rx text[];
    room integer;
    taken bigint[] := '{}';
    newest bigint := 0;
    fresh record;
BEGIN
    -- A claim commits without waiting for the disk: lost in a server crash, its events are only
    -- handed out again.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- The group's row serialises its claims: the position moves one claim at a time.
    SELECT s.position, s.regexes INTO pos, rx
    FROM {schema}.subscriptions AS s WHERE s.name = grp FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription % no longer exists', grp USING ERRCODE = 'no_data_found';
    END IF;
    -- Batches whose lease ran out or was handed back become single leases of their events not
    -- acknowledged yet (still run out, under their consumer: a late acknowledgement still
    -- counts until another consumer takes the event); fully acknowledged ones just go. A batch
    -- that another transaction holds (an acknowledgement, retention) is left to the next
    -- claim: waiting for it while holding the group's row could deadlock with retention.
    WITH split AS (
        DELETE FROM {schema}.leased_batches AS b
        WHERE b.subscription = grp AND b.first_seq IN (
            SELECT o.first_seq FROM {schema}.leased_batches AS o
            WHERE o.subscription = grp AND (o.expires_at <= now() OR o.pending = '{}')
            FOR UPDATE SKIP LOCKED
        )
        RETURNING b.consumer, b.expires_at, b.pending
    )
    INSERT INTO {schema}.leases (subscription, seq, consumer, expires_at, attempt)
    SELECT grp, p.seq, split.consumer, split.expires_at, 1
    FROM split, unnest(split.pending) AS p (seq);
    -- First the group's events whose lease ran out or was handed back (a lease handed back runs
    -- out at -infinity), oldest first; competing consumers skip each other's rows. Looked up by
    -- leases_due: the primary key would visit every lease of the group, and the dead entries of
    -- every lease acknowledged since the last vacuum.
    RETURN QUERY
    UPDATE {schema}.leases AS l
    SET consumer = consumer_id,
        expires_at = now() + make_interval(secs => lease),
        attempt = l.attempt + 1
    FROM (
        SELECT d.seq FROM {schema}.leases AS d
        WHERE d.subscription = grp AND d.expires_at <= now()
        ORDER BY d.seq LIMIT lim
        FOR UPDATE SKIP LOCKED
    ) AS due
    JOIN {schema}.events AS e ON e.seq = due.seq
    WHERE l.subscription = grp AND l.seq = due.seq
    RETURNING l.seq, l.attempt, e.id, e.topic, e.time_us, e.payload, e.metadata;
    GET DIAGNOSTICS room = ROW_COUNT;
    room := lim - room;
    IF room <= 0 THEN
        RETURN;
    END IF;
    -- Then the next matching events after the position, with the newest seq of the same
    -- snapshot, leased together as one batch.
    FOR fresh IN
        SELECT head.seq AS head, e.seq, e.id, e.topic, e.time_us, e.payload, e.metadata
        FROM (SELECT coalesce(max(h.seq), 0) AS seq FROM {schema}.events AS h) AS head
        LEFT JOIN LATERAL (
            SELECT ev.seq, ev.id, ev.topic, ev.time_us, ev.payload, ev.metadata
            FROM {schema}.events AS ev
            WHERE ev.seq > pos
              AND (ev.target = grp OR (ev.target IS NULL AND ev.topic ~ ANY(rx)))
            ORDER BY ev.seq LIMIT room
        ) AS e ON true
        ORDER BY e.seq
    LOOP
        newest := fresh.head;
        CONTINUE WHEN fresh.seq IS NULL;
        taken := taken || fresh.seq;
        r_seq := fresh.seq;
        r_attempt := 1;
        r_id := fresh.id;
        r_topic := fresh.topic;
        r_time_us := fresh.time_us;
        r_payload := fresh.payload;
        r_metadata := fresh.metadata;
        RETURN NEXT;
    END LOOP;
    IF cardinality(taken) > 0 THEN
        INSERT INTO {schema}.leased_batches (subscription, first_seq, consumer, expires_at, pending)
        VALUES (grp, taken[1], consumer_id, now() + make_interval(secs => lease), taken);
    END IF;
    -- With fewer than asked for, everything up to the head was looked at: moving there spares
    -- the next claim from reading it again. With as many, up to the last one leased.
    IF cardinality(taken) = room THEN
        newest := r_seq;
    END IF;
    IF newest > pos THEN
        UPDATE {schema}.subscriptions SET position = greatest(position, newest) WHERE name = grp;
    END IF;
END
$$;

CREATE FUNCTION {schema}.ack(
    groups text[],
    seqs bigint[],
    consumers text[]
) RETURNS TABLE (r_subscription text, r_seq bigint, r_consumer text)
LANGUAGE plpgsql
-- One lookup by primary key per acknowledgement, whatever the statistics say: a hash join would
-- read every lease, and the dead rows of every lease acknowledged since the last vacuum.
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    acked integer;
BEGIN
    -- Committed without waiting for the disk: an acknowledgement lost in a server crash only
    -- means the event is delivered again.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- Only what the acknowledging consumers still hold. First in batches: a batch goes once
    -- all its events are acknowledged, or else loses the acknowledged ones from its pending
    -- events. The batches are locked first, in key order, and everything is decided from the
    -- locked rows (READ COMMITTED hands a locker the newest version): concurrent
    -- acknowledgements of one batch add up, and an event acknowledged twice is held once.
    RETURN QUERY
    WITH asked AS (
        SELECT a.g, a.c, array_agg(a.s) AS done
        FROM unnest(groups, seqs, consumers) AS a (g, s, c)
        GROUP BY a.g, a.c
    ), hit AS (
        SELECT b.subscription, b.first_seq, b.consumer, asked.done,
            ARRAY(SELECT p FROM unnest(b.pending) AS p WHERE p = ANY(asked.done)) AS held,
            b.pending <@ asked.done AS whole
        FROM asked JOIN {schema}.leased_batches AS b
            ON b.subscription = asked.g AND b.consumer = asked.c AND b.pending && asked.done
        ORDER BY b.subscription, b.first_seq
        FOR UPDATE OF b
    ), finished AS (
        DELETE FROM {schema}.leased_batches AS b
        USING hit
        WHERE b.subscription = hit.subscription AND b.first_seq = hit.first_seq AND hit.whole
        RETURNING b.subscription, hit.held AS done, b.consumer
    ), shrunk AS (
        UPDATE {schema}.leased_batches AS b
        SET pending = ARRAY(SELECT p FROM unnest(b.pending) AS p WHERE p <> ALL(hit.done))
        FROM hit
        WHERE b.subscription = hit.subscription AND b.first_seq = hit.first_seq AND NOT hit.whole
        RETURNING b.subscription, hit.held AS done, b.consumer
    )
    SELECT h.subscription, d.s, h.consumer
    FROM (SELECT * FROM finished UNION ALL SELECT * FROM shrunk) AS h, unnest(h.done) AS d (s);
    -- Then single leases (events handed out again), unless every acknowledgement was of a batch.
    GET DIAGNOSTICS acked = ROW_COUNT;
    IF acked = cardinality(seqs) THEN
        RETURN;
    END IF;
    RETURN QUERY
    DELETE FROM {schema}.leases AS l
    USING unnest(groups, seqs, consumers) AS a (g, s, c)
    WHERE l.subscription = a.g AND l.seq = a.s AND l.consumer = a.c
    RETURNING l.subscription, l.seq, l.consumer;
END
$$;
