-- Who may read a subscription over the bus, shared by every server on the schema (as
-- Backstage's event_bus_subscriptions.created_by): 'in-process' for the events service's own
-- subscriptions, the bus caller that made it (service=<subject>), NULL when not recorded. The
-- subscriptions made before this migration have none; the events service marks its own at its
-- next start and a bus caller claims the others.

ALTER TABLE {schema}.subscriptions ADD COLUMN owner text;

COMMENT ON COLUMN {schema}.subscriptions.owner IS 'Who may read it over the bus: in-process, service=<subject>, or NULL (not recorded)';
