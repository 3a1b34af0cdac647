-- Looking an event up by its id (`callboard events show`, the console's event page).

CREATE INDEX events_id ON {schema}.events (id);
