-- A multi-step bot command waiting for the user's next message (a login waiting for its
-- verification code), kept here so that whichever worker gets the next message or request
-- continues it, and so that it survives a restart. The command's name and the identifier only.
CREATE TABLE pending_command (
    mxid       TEXT    NOT NULL PRIMARY KEY,
    command    TEXT    NOT NULL,
    created_at BIGINT  NOT NULL
);
