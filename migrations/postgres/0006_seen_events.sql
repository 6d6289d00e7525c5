-- Matrix events already queued, by id, whichever way they came (an appservice transaction or
-- the catch-up after a homeserver outage): an event is queued once. Identifiers only.
CREATE TABLE matrix_event_seen (
    event_id    TEXT   NOT NULL PRIMARY KEY,
    received_at BIGINT NOT NULL
);
CREATE INDEX matrix_event_seen_by_age ON matrix_event_seen (received_at);
