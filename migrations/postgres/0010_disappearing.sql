-- Disappearing messages: each portal's timer (seconds after sending; a row only for portals that
-- have one), and the Matrix events waiting to be redacted, with when. Both survive restarts.
CREATE TABLE disappear_timer (
    room_id TEXT   NOT NULL PRIMARY KEY,
    seconds BIGINT NOT NULL
);
CREATE TABLE disappearing (
    room_id  TEXT   NOT NULL,
    event_id TEXT   NOT NULL,
    due_at   BIGINT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);
CREATE INDEX disappearing_due ON disappearing (due_at);
