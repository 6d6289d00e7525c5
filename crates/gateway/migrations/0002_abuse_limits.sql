-- Abuse limits (docs/interop-protocol.md §19) and the group's latest changer.

-- Wrong verification codes per account, kept apart from the pending code so that a new
-- `Register` cannot reset them.
CREATE TABLE verify_budget (
    account      TEXT    NOT NULL PRIMARY KEY,
    window_start INTEGER NOT NULL,
    failures     INTEGER NOT NULL,
    locked_until INTEGER NOT NULL DEFAULT 0,
    lockouts     INTEGER NOT NULL DEFAULT 0
);

ALTER TABLE grp ADD COLUMN changed_by TEXT NOT NULL DEFAULT '';

CREATE INDEX envelope_expiry ON envelope (server_timestamp);
CREATE INDEX blob_expiry ON blob (created_at);
CREATE INDEX sent_expiry ON sent (server_timestamp);
