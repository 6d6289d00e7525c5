-- The Matrix user who wrote a bridged message (or reaction), so that only its author can edit or
-- delete it on the network. Rows written before this column existed have ''.
ALTER TABLE message_map ADD COLUMN matrix_sender TEXT NOT NULL DEFAULT '';
