-- name: insert_event
-- Store a published event; a known (topic, delivery id) is ignored (no row changes).
INSERT OR IGNORE INTO events (id, topic, target, delivery_id, time_us, stored_at, payload, metadata)
VALUES (:id, :topic, :target, :delivery_id, :time_us, :stored_at, :payload, :metadata);

-- name: insert_events
-- Store the events of a batch, in order (executed once per event, positional parameters: id,
-- topic, delivery_id, time_us, stored_at, payload, metadata); a known (topic, delivery id) is
-- ignored.
INSERT OR IGNORE INTO events (id, topic, target, delivery_id, time_us, stored_at, payload, metadata)
VALUES (?, ?, NULL, ?, ?, ?, ?, ?);

-- name: stored_deliveries
-- The (topic, delivery id) pairs stored after a seq, as one JSON array.
SELECT json_group_array(json_array(topic, delivery_id)) FROM events
WHERE seq > :after AND delivery_id IS NOT NULL;

-- name: insert_dead_letter
-- Keep a dead letter of a subscription.
INSERT INTO dead_letters (subscription, id, topic, time_us, payload, metadata)
VALUES (:subscription, :id, :topic, :time_us, :payload, :metadata);

-- name: head
-- The newest seq handed out so far (0 for an empty store).
SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0);

-- name: first_since
-- The oldest event stored at or after a moment.
SELECT min(seq) FROM events WHERE stored_at >= :since;

-- name: subscription
-- One subscription's topics and position.
SELECT topics, position FROM subscriptions WHERE name = :name;

-- name: insert_subscription
-- Create a subscription at a position.
INSERT INTO subscriptions (name, topics, position, created_at, updated_at, owner)
VALUES (:name, :topics, :position, :now, :now, :owner);

-- name: claim_owner
-- Record the owner of a subscription that has none yet; an owner once set is kept.
UPDATE subscriptions SET owner = :owner WHERE name = :name AND owner IS NULL;

-- name: add_owner
-- Upgrade a version 1 file: subscriptions get their owner column (NULL: not recorded).
ALTER TABLE subscriptions ADD COLUMN owner TEXT;

-- name: update_topics
-- Change the topics an existing subscription reads.
UPDATE subscriptions SET topics = :topics, updated_at = :now WHERE name = :name;

-- name: reclaim
-- Lease to a consumer the group's events whose lease ran out or was handed back, oldest first.
-- A lease ending after :expires_at (now + a lease's length) was written before the clock moved
-- back: it is taken as run out rather than trusted for as long as the clock was off.
UPDATE leases SET consumer = :consumer, expires_at = :expires_at, attempt = attempt + 1
WHERE subscription = :group AND seq IN (
    SELECT seq FROM leases
    WHERE subscription = :group
      AND (consumer IS NULL OR expires_at <= :now OR expires_at > :expires_at)
    ORDER BY seq LIMIT :limit
)
RETURNING seq, attempt;

-- name: fresh
-- The group's next events after its position, as one JSON array of seqs. Topics equal to one of
-- the literal patterns (a JSON array) match without calling back into Python.
SELECT json_group_array(seq) FROM (
    SELECT seq FROM events
    WHERE seq > :position
      AND (target = :group OR (target IS NULL AND (
          topic IN (SELECT value FROM json_each(:literals))
          OR (:wildcards AND callboard_match(:topics, topic)))))
    ORDER BY seq LIMIT :limit
);

-- name: insert_leases
-- Lease new events (a JSON array of seqs) to a consumer.
INSERT INTO leases (subscription, seq, consumer, expires_at, attempt)
SELECT :group, value, :consumer, :expires_at, 1 FROM json_each(:seqs);

-- name: move_position
-- Move a subscription's position forward.
UPDATE subscriptions SET position = max(position, :position) WHERE name = :group;

-- name: events_by_seq
-- The stored events for a list of seqs (a JSON array), as one JSON array of
-- [seq, id, topic, time_us, payload, metadata].
SELECT json_group_array(json_array(seq, id, topic, time_us, payload, metadata)) FROM events
WHERE seq IN (SELECT value FROM json_each(:seqs));

-- name: ack
-- Delete a lease, if the consumer still holds it.
DELETE FROM leases WHERE subscription = :group AND seq = :seq AND consumer = :consumer;

-- name: held_leases
-- How many of a batch of acknowledgements (a JSON array of [group, seq, consumer]) are of leases
-- their consumer still holds.
SELECT count(*) FROM leases AS l JOIN json_each(:acks) AS a
    ON l.subscription = json_extract(a.value, '$[0]') AND l.seq = json_extract(a.value, '$[1]')
   AND l.consumer = json_extract(a.value, '$[2]');

-- name: ack_many
-- Delete a batch of leases (a JSON array of [group, seq, consumer]) held by those consumers.
DELETE FROM leases WHERE (subscription, seq, consumer) IN (
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
    FROM json_each(:acks)
);

-- name: release
-- Hand every lease of a consumer back to its group.
UPDATE leases SET consumer = NULL, expires_at = 0 WHERE subscription = :group AND consumer = :consumer;

-- name: release_some
-- Hand leases of a consumer (a JSON array of seqs) back to their group.
UPDATE leases SET consumer = NULL, expires_at = 0
WHERE subscription = :group AND consumer = :consumer
  AND seq IN (SELECT value FROM json_each(:seqs));

-- name: renew
-- Push the deadline of every lease held by live consumers (a JSON array of ids).
UPDATE leases SET expires_at = :expires_at
WHERE consumer IN (SELECT value FROM json_each(:consumers));

-- name: dead_letters
-- A subscription's dead letters, oldest first, all or those with the given ids (a JSON array).
SELECT seq, id, topic, time_us, payload, metadata FROM dead_letters
WHERE subscription = :subscription
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
ORDER BY seq LIMIT :limit;

-- name: delete_dead_letters
-- Take dead letters away by seq (a JSON array).
DELETE FROM dead_letters WHERE seq IN (SELECT value FROM json_each(:seqs));

-- name: delete_subscription
-- Forget a subscription (its leases and dead letters go first).
DELETE FROM subscriptions WHERE name = :name;

-- name: delete_leases_of
-- Every lease of a subscription.
DELETE FROM leases WHERE subscription = :name;

-- name: delete_dead_letters_of
-- Every dead letter of a subscription.
DELETE FROM dead_letters WHERE subscription = :name;

-- name: subscriptions
-- Every subscription with its owner and lease counts.
SELECT s.name, s.topics, s.position, s.lost, s.owner,
       (SELECT count(*) FROM leases l
        WHERE l.subscription = s.name AND l.consumer IS NOT NULL AND l.expires_at > :now),
       (SELECT count(*) FROM leases l
        WHERE l.subscription = s.name AND (l.consumer IS NULL OR l.expires_at <= :now))
FROM subscriptions s ORDER BY s.name;

-- name: due
-- Every subscription, and whether leases of it wait to be claimed again (handed back or run
-- out, as ``reclaim`` finds them); one lookup of the leases' key per subscription.
SELECT s.name, EXISTS (
    SELECT 1 FROM leases l
    WHERE l.subscription = s.name
      AND (l.consumer IS NULL OR l.expires_at <= :now OR l.expires_at > :latest)
)
FROM subscriptions s;

-- name: stored_topics
-- The topics and targets of the events stored after a seq, up to another (another process's).
SELECT DISTINCT topic, target FROM events WHERE seq > :after AND seq <= :upto;

-- name: expire_range
-- Where a retention pass deletes, without reading the events it keeps: the newest events older
-- than the maximum and the minimum age (each one step down the stored_at index, the last of the
-- events stored at that moment: stored_at grows with seq, nearly) and the edge of the newest
-- events kept by count (0 for each one missing).
SELECT
    coalesce((SELECT seq FROM events WHERE stored_at < :old
              ORDER BY stored_at DESC, seq DESC LIMIT 1), 0),
    coalesce((SELECT seq FROM events WHERE stored_at < :young
              ORDER BY stored_at DESC, seq DESC LIMIT 1), 0),
    coalesce((SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET :max_count), 0);

-- name: expire_window
-- The end of a retention batch: the seq of the :skip + 1th event after :after (NULL when fewer
-- are left), so that a batch reads at most a batch of the primary key.
SELECT seq FROM events WHERE seq > :after ORDER BY seq LIMIT 1 OFFSET :skip;

-- name: expire
-- Delete a batch of a retention pass: the events after :after up to :upto (a range of the
-- primary key) older than the maximum age, or up to the count edge and older than the minimum
-- age. Every event's age is checked (stored_at only nearly grows with seq); the unary + keeps
-- the planner on the primary key rather than the stored_at index.
DELETE FROM events
WHERE seq > :after AND seq <= :upto
  AND (+stored_at < :old OR (seq <= :edge AND +stored_at < :young))
RETURNING seq, topic, target;

-- name: behind_positions
-- The topics and position of the subscriptions that had not received every event up to a seq,
-- to account for what retention deletes.
SELECT name, topics, position FROM subscriptions WHERE position < :last;

-- name: drop_leases
-- Delete leases of deleted events (a JSON array of seqs between :after and :last): only groups
-- past :after can hold one, each found by its primary key range.
DELETE FROM leases
WHERE subscription IN (SELECT name FROM subscriptions WHERE position > :after)
  AND seq > :after AND seq <= :last
  AND seq IN (SELECT value FROM json_each(:seqs))
RETURNING subscription;

-- name: add_lost
-- Count events a subscription lost to retention.
UPDATE subscriptions SET lost = lost + :lost, updated_at = :now WHERE name = :name;

-- name: seq_bounds
-- The newest stored seq (0: none) and the oldest (NULL: none), each from one end of the key.
SELECT coalesce((SELECT max(seq) FROM events), 0), (SELECT min(seq) FROM events);

-- name: tally_events
-- Events in a seq range, counted by bucket of seqs, topic and target (a range search on the key).
SELECT (seq - 1) / :bucket, topic, target, count(*) FROM events
WHERE seq > :after AND seq <= :upto
GROUP BY 1, 2, 3;

-- name: events_between
-- Events in a seq range, one by one, in seq order (a range search on the key).
SELECT seq, topic, target FROM events WHERE seq > :after AND seq <= :upto ORDER BY seq;

-- name: first_stored_since
-- The seq of the first event stored at or after a moment (one step down the stored_at index).
SELECT seq FROM events WHERE stored_at >= :since ORDER BY stored_at, seq LIMIT 1;

-- name: last_stored_before
-- The seq of the last event stored before a moment (one step down the stored_at index).
SELECT seq FROM events WHERE stored_at < :until ORDER BY stored_at DESC, seq DESC LIMIT 1;

-- name: find_events
-- A page of stored events, newest first, between two seqs (a backward walk of the primary key:
-- the unary + keeps the planner off the stored_at index), of the topics of the literal patterns
-- (a JSON array) or of the wildcard ones; :every for any topic.
SELECT seq, id, topic, target, time_us, stored_at, payload, metadata FROM events
WHERE seq < :before AND seq >= :low
  AND +stored_at >= :since AND +stored_at < :until
  AND (:every OR topic IN (SELECT value FROM json_each(:literals))
       OR (:wildcards AND callboard_match(:topics, topic)))
ORDER BY seq DESC LIMIT :limit;

-- name: events_with_id
-- The stored events with an id, newest first (the events_id index).
SELECT seq, id, topic, target, time_us, stored_at, payload, metadata FROM events
WHERE id = :id ORDER BY seq DESC;

-- name: find_dead_letters
-- A page of dead letters, newest first, of the subscriptions whose dead-letter topic the
-- patterns match, all or the one with an id.
SELECT seq, subscription, id, topic, time_us, payload, metadata FROM dead_letters
WHERE seq < :before AND seq >= :after AND time_us >= :since_us AND time_us < :until_us
  AND (:id IS NULL OR id = :id)
  AND (topic IN (SELECT value FROM json_each(:literals))
       OR (:wildcards AND callboard_match(:topics, topic)))
ORDER BY seq DESC LIMIT :limit;

-- name: subscription_origins
-- Every subscription's topics, position and when it was made (Unix seconds).
SELECT name, topics, position, created_at FROM subscriptions;

-- name: leases_of
-- The leases of one event (a seq) in some subscriptions (a JSON array): by the primary key.
SELECT subscription, consumer, expires_at, attempt FROM leases
WHERE subscription IN (SELECT value FROM json_each(:groups)) AND seq = :seq;

-- name: dead_letters_naming
-- The dead letters that name an event id (the original event's, in their metadata).
SELECT subscription, id, topic, time_us, payload, metadata FROM dead_letters
WHERE json_extract(metadata, '$."callboard-event-id"') = :id ORDER BY seq;
