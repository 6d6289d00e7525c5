-- Shared group portals: every login of this bridge in an interop group has its portal row, and
-- the rows share one room (a DM portal still has a room of its own).
DROP INDEX portal_room;
CREATE INDEX portal_room ON portal (room_id);
CREATE INDEX portal_chat ON portal (chat_id);

-- Which login bridges a network message that several logins of a shared group portal receive:
-- the first to claim it; a claim not finished within a minute may be taken over.
CREATE TABLE message_claim (
    room_id    TEXT   NOT NULL,
    sender     TEXT   NOT NULL,
    message_id TEXT   NOT NULL,
    owner      TEXT   NOT NULL,
    claimed_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, sender, message_id)
);
CREATE INDEX message_claim_age ON message_claim (claimed_at);
