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

CREATE TABLE {schema}.subscriptions (
    name text PRIMARY KEY,
    topics text[] NOT NULL,
    regexes text[] NOT NULL,
    position bigint NOT NULL,
    lost bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON COLUMN {schema}.subscriptions.position IS 'Every event up to here was handed out';
COMMENT ON COLUMN {schema}.subscriptions.lost IS 'Events retention deleted before the subscription received them';

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
