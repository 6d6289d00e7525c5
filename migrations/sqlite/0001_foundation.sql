-- Appservice transactions already applied, so that a retried transaction has no second effect.
-- Synapse restarts its transaction ids, so the body hash is part of the identity.
CREATE TABLE appservice_txn (
    txn_id      TEXT    NOT NULL PRIMARY KEY,
    body_hash   BLOB    NOT NULL,
    received_at INTEGER NOT NULL
);

-- Durable queue of inbound Matrix events, sealed with the vault's queue key.
CREATE TABLE event_queue (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id     TEXT,
    sealed      BLOB    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

-- Matrix users known to the bridge.
CREATE TABLE matrix_user (
    mxid            TEXT NOT NULL PRIMARY KEY,
    management_room TEXT
);

CREATE TABLE kv (
    key   TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);

-- Vault: per-owner data keys wrapped by the master key, and records sealed by the data keys.
CREATE TABLE vault_key (
    owner         TEXT NOT NULL PRIMARY KEY,
    wrapped       BLOB NOT NULL,
    master_key_id TEXT NOT NULL
);

CREATE TABLE vault_record (
    owner  TEXT NOT NULL,
    kind   TEXT NOT NULL,
    name   TEXT NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (owner, kind, name)
);
