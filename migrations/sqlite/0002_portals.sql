-- Interop logins of Matrix users (the credentials themselves are sealed in the vault).
CREATE TABLE login (
    mxid       TEXT    NOT NULL PRIMARY KEY,
    account    TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);

-- One portal room per interop chat of a login: a contact (dm) or a group.
CREATE TABLE portal (
    receiver   TEXT    NOT NULL,
    chat_id    TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    room_id    TEXT,
    name       TEXT    NOT NULL DEFAULT '',
    relay      TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (receiver, chat_id)
);
CREATE UNIQUE INDEX portal_room ON portal (room_id);

-- Ghost users of interop contacts.
CREATE TABLE ghost (
    account     TEXT NOT NULL PRIMARY KEY,
    mxid        TEXT NOT NULL,
    displayname TEXT NOT NULL DEFAULT '',
    avatar_mxc  TEXT NOT NULL DEFAULT ''
);

-- Matrix event ids and interop message ids of the same message.
CREATE TABLE message_map (
    room_id    TEXT    NOT NULL,
    event_id   TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    sender     TEXT    NOT NULL,
    part       TEXT    NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, event_id)
);
CREATE UNIQUE INDEX message_map_interop ON message_map (room_id, message_id, sender, part);
