-- The SQLite broker's schema (PRAGMA user_version 3). Applied at start; every statement is
-- idempotent so several processes may start on one file at once.

-- Every published event, in publish order. AUTOINCREMENT: a seq is never handed out twice, even
-- after retention deleted the newest rows, so a subscription's position stays meaningful.
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    -- Set by deliver_to (a redriven dead letter): only this subscription receives the event.
    target TEXT,
    -- The provider's delivery id; unique per topic while the event is retained.
    delivery_id TEXT,
    time_us INTEGER NOT NULL,
    -- Unix seconds when stored: what retention and start-from-a-time go by.
    stored_at REAL NOT NULL,
    payload TEXT NOT NULL,
    metadata TEXT NOT NULL
);

CREATE UNIQUE INDEX IF NOT EXISTS events_delivery_id
    ON events (topic, delivery_id) WHERE delivery_id IS NOT NULL;

CREATE INDEX IF NOT EXISTS events_stored_at ON events (stored_at);

-- Looking an event up by its id (`callboard events show`). Version 2 files get it at start.
CREATE INDEX IF NOT EXISTS events_id ON events (id);

-- Consumer groups. Every event up to position was handed out (and is acknowledged unless a
-- lease for it remains).
CREATE TABLE IF NOT EXISTS subscriptions (
    name TEXT PRIMARY KEY,
    topics TEXT NOT NULL,
    position INTEGER NOT NULL,
    -- Events retention deleted before the subscription received them.
    lost INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    -- Who may read it over the bus: 'in-process', a bus caller (service=<subject>), or NULL.
    -- Version 1 files get the column from the add_owner query.
    owner TEXT
) WITHOUT ROWID;

-- Events handed out and not acknowledged. consumer NULL or expires_at past: back with the group.
CREATE TABLE IF NOT EXISTS leases (
    subscription TEXT NOT NULL,
    seq INTEGER NOT NULL,
    consumer TEXT,
    expires_at REAL NOT NULL,
    attempt INTEGER NOT NULL,
    PRIMARY KEY (subscription, seq)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS leases_consumer ON leases (consumer);

-- Dead letters are kept until taken, outside the retention window of events.
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription TEXT NOT NULL,
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    payload TEXT NOT NULL,
    metadata TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS dead_letters_subscription ON dead_letters (subscription, seq);

PRAGMA user_version = 3;
