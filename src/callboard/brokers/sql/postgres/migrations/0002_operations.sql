-- The broker's hot operations as functions: a publish batch, a claim and an acknowledgement
-- batch are each ONE statement, so each costs one round trip, one plan the server keeps for the
-- session, and the driver's per-statement work once. Called on a connection in autocommit mode,
-- the statement is its own transaction: the advisory lock below is held until its commit.

-- A claim's look for leases run out or handed back (those run out at -infinity).
CREATE INDEX leases_due ON {schema}.leases (subscription, expires_at);

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
    -- In order; a known (topic, delivery id) is skipped. Only the stored delivery ids come back:
    -- what is not among them was a redelivery.
    RETURN QUERY
    WITH stored AS (
        INSERT INTO {schema}.events AS e (id, topic, target, delivery_id, time_us, payload, metadata)
        SELECT b.id, b.topic, b.target, b.delivery_id, b.time_us, b.payload, b.metadata
        FROM unnest(ids, topics, targets, delivery_ids, times, payloads, metadatas)
            WITH ORDINALITY AS b (id, topic, target, delivery_id, time_us, payload, metadata, n)
        ORDER BY b.n
        ON CONFLICT (topic, delivery_id) WHERE delivery_id IS NOT NULL DO NOTHING
        RETURNING e.topic, e.delivery_id
    )
    SELECT s.topic, s.delivery_id FROM stored AS s WHERE s.delivery_id IS NOT NULL;
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
    taken integer := 0;
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
    -- Then the next matching events after the position, with the newest seq of the same snapshot.
    FOR fresh IN
        WITH due AS (
            SELECT ev.seq FROM {schema}.events AS ev
            WHERE ev.seq > pos
              AND (ev.target = grp OR (ev.target IS NULL AND ev.topic ~ ANY(rx)))
            ORDER BY ev.seq LIMIT room
        ), leased AS (
            INSERT INTO {schema}.leases (subscription, seq, consumer, expires_at, attempt)
            SELECT grp, due.seq, consumer_id, now() + make_interval(secs => lease), 1 FROM due
            RETURNING leases.seq
        )
        SELECT head.seq AS head, e.seq, e.id, e.topic, e.time_us, e.payload, e.metadata
        FROM (SELECT coalesce(max(h.seq), 0) AS seq FROM {schema}.events AS h) AS head
        LEFT JOIN (leased JOIN {schema}.events AS e ON e.seq = leased.seq) ON true
        ORDER BY e.seq
    LOOP
        newest := fresh.head;
        CONTINUE WHEN fresh.seq IS NULL;
        taken := taken + 1;
        r_seq := fresh.seq;
        r_attempt := 1;
        r_id := fresh.id;
        r_topic := fresh.topic;
        r_time_us := fresh.time_us;
        r_payload := fresh.payload;
        r_metadata := fresh.metadata;
        RETURN NEXT;
    END LOOP;
    -- With fewer than asked for, everything up to the head was looked at: moving there spares
    -- the next claim from reading it again. With as many, up to the last one leased.
    IF taken = room THEN
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
BEGIN
    -- Committed without waiting for the disk: an acknowledgement lost in a server crash only
    -- means the event is delivered again.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- Only leases still held by the consumers acknowledging them.
    RETURN QUERY
    DELETE FROM {schema}.leases AS l
    USING unnest(groups, seqs, consumers) AS a (g, s, c)
    WHERE l.subscription = a.g AND l.seq = a.s AND l.consumer = a.c
    RETURNING l.subscription, l.seq, l.consumer;
END
$$;
