-- Avatars: the interop blob an avatar came from, so an unchanged avatar is not copied again.
ALTER TABLE ghost ADD COLUMN avatar_blob TEXT NOT NULL DEFAULT '';
ALTER TABLE portal ADD COLUMN avatar_blob TEXT NOT NULL DEFAULT '';
ALTER TABLE portal ADD COLUMN avatar_mxc TEXT NOT NULL DEFAULT '';
