-- Leases of the workers that share this database (several bridge processes on PostgreSQL):
-- `worker:<id>` is a worker's heartbeat, `login:<mxid>` the worker running that interop login,
-- `bot` the worker handling the rooms no login owns. A lease is held until `expires_at`
-- (milliseconds since the Unix epoch, the workers' clocks) unless its holder renews it;
-- `generation` counts the changes of holder. Identifiers only.
CREATE TABLE lease (
    name       TEXT    NOT NULL PRIMARY KEY,
    holder     TEXT    NOT NULL,
    expires_at BIGINT  NOT NULL,
    generation BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX lease_by_holder ON lease (holder);
