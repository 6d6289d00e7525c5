-- The reference interop gateway's state (SQLite).
CREATE TABLE account (
    account         TEXT    NOT NULL PRIMARY KEY,
    secret_hash     BLOB    NOT NULL,
    registration_id INTEGER NOT NULL DEFAULT 0,
    identity_key    BLOB,
    name            TEXT    NOT NULL DEFAULT '',
    avatar_blob     TEXT    NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL
);

CREATE TABLE verification (
    account    TEXT    NOT NULL PRIMARY KEY,
    code       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    tries      INTEGER NOT NULL DEFAULT 0
);

-- kind: 'signed' (one), 'kyber_last_resort' (one), 'one_time', 'kyber'
CREATE TABLE prekey (
    account    TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    id         INTEGER NOT NULL,
    public_key BLOB    NOT NULL,
    signature  BLOB,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (account, kind, id)
);
CREATE INDEX prekey_order ON prekey (account, kind, seq);

CREATE TABLE envelope (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient        TEXT    NOT NULL,
    sender           TEXT    NOT NULL,
    timestamp        INTEGER NOT NULL,
    server_timestamp INTEGER NOT NULL,
    kind             INTEGER NOT NULL,
    ciphertext       BLOB    NOT NULL,
    message_id       TEXT    NOT NULL DEFAULT '',
    grp              TEXT    NOT NULL DEFAULT '',
    extra            BLOB
);
CREATE INDEX envelope_recipient ON envelope (recipient, id);

-- Idempotency of Send: (sender, message_id) is stored once.
CREATE TABLE sent (
    sender           TEXT    NOT NULL,
    message_id       TEXT    NOT NULL,
    server_timestamp INTEGER NOT NULL,
    recipients       INTEGER NOT NULL,
    PRIMARY KEY (sender, message_id)
);

-- Accounts that exchanged envelopes, for presence.
CREATE TABLE contact (
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    PRIMARY KEY (a, b)
);

CREATE TABLE grp (
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    avatar_blob TEXT    NOT NULL DEFAULT '',
    revision    INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE grp_member (
    grp     TEXT NOT NULL,
    account TEXT NOT NULL,
    PRIMARY KEY (grp, account)
);

CREATE TABLE blob (
    id         TEXT    NOT NULL PRIMARY KEY,
    size       INTEGER NOT NULL,
    sha256     BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
