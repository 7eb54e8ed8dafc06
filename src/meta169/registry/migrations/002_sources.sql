-- meta169 registry schema 2: which source owns each network, router and instance.
--
-- A sync (meta169 sync libvirt/openstack/FILE) changes and removes only the objects
-- its own source owns. Rows written before this step came from `meta169 import` or
-- the admin API, which cannot be told apart afterwards: they become 'inventory'.
-- ADD COLUMN with a constant default is plain SQL for SQLite and PostgreSQL alike
-- (sqlite.org/lang_altertable.html: a NOT NULL column needs a non-NULL default).

ALTER TABLE networks ADD COLUMN source TEXT NOT NULL DEFAULT 'inventory';
ALTER TABLE routers ADD COLUMN source TEXT NOT NULL DEFAULT 'inventory';
ALTER TABLE instances ADD COLUMN source TEXT NOT NULL DEFAULT 'inventory';
CREATE INDEX instances_source ON instances (source);
