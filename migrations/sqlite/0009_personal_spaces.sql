-- Each login's personal space: the room (an m.space) holding its portals.
ALTER TABLE matrix_user ADD COLUMN space_room TEXT;
