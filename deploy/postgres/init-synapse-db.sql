-- Runs once, when the PostgreSQL volume is initialised. The bridge's database ("bridge")
-- is created by the image from POSTGRES_DB; Synapse needs its own, with C collation.
CREATE DATABASE synapse
    ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
