-- Each recipient's queue length, kept by triggers in the same transactions as the envelopes, so
-- that the queue limit (docs/interop-protocol.md §19) is checked in constant time: counting the
-- queue on every `Send` cost work in proportion to its length, which any sender could make long.
CREATE TABLE queue_size (
    recipient TEXT    NOT NULL PRIMARY KEY,
    n         INTEGER NOT NULL
);

INSERT INTO queue_size (recipient, n)
    SELECT recipient, COUNT(*) FROM envelope GROUP BY recipient;

CREATE TRIGGER queue_size_insert AFTER INSERT ON envelope
BEGIN
    INSERT INTO queue_size (recipient, n) VALUES (NEW.recipient, 1)
        ON CONFLICT (recipient) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER queue_size_delete AFTER DELETE ON envelope
BEGIN
    UPDATE queue_size SET n = n - 1 WHERE recipient = OLD.recipient;
END;

CREATE TRIGGER queue_size_update AFTER UPDATE OF recipient ON envelope
BEGIN
    UPDATE queue_size SET n = n - 1 WHERE recipient = OLD.recipient;
    INSERT INTO queue_size (recipient, n) VALUES (NEW.recipient, 1)
        ON CONFLICT (recipient) DO UPDATE SET n = n + 1;
END;
