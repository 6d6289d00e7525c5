-- The matrix-sdk-crypto state of the bridge's Matrix devices (the bot's and each ghost's): Olm
-- accounts, sessions, device lists, cross-signing identities. One row per item, the value sealed
-- with the bridge's vault data key. `idx` holds the secondary lookup key of a row (an Olm
-- session's peer key, a Megolm session's room, a device's user): identifiers only.
CREATE TABLE crypto_item (
    device TEXT NOT NULL,
    kind   TEXT NOT NULL,
    name   TEXT NOT NULL,
    idx    TEXT NOT NULL DEFAULT '',
    backup TEXT NOT NULL DEFAULT '',
    sealed BLOB NOT NULL,
    PRIMARY KEY (device, kind, name)
);
CREATE INDEX crypto_item_by_idx ON crypto_item (device, kind, idx);
