-- A publish batch without delivery ids is stored by a plain INSERT. INSERT ... ON CONFLICT
-- checks the unique index before each row and confirms each row in the WAL afterwards, which
-- costs a seventh of a publish's WAL and its CPU for nothing when no row can conflict. The
-- broker passes delivery_ids as NULL for such a batch.

CREATE OR REPLACE FUNCTION {schema}.publish(
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
