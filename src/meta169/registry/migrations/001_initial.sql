-- meta169 registry schema 1.
--
-- One file for SQLite and PostgreSQL: only types both accept. Binary user data is
-- declared BYTEA, which PostgreSQL needs; SQLite gives that name NUMERIC affinity,
-- and NUMERIC affinity stores BLOB values unchanged (sqlite.org/datatype3.html 3.1).
-- JSON documents are TEXT, timestamps are ISO 8601 TEXT: both round-trip exactly.
-- Statements end with ';' at the end of a line (the runner splits on that).

-- The revision counter: one row, bumped in the transaction of every write. In
-- PostgreSQL the UPDATE also takes a row lock that serializes writers, so revisions
-- commit in order.
CREATE TABLE registry_revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL
);
INSERT INTO registry_revision (id, revision) VALUES (1, 0);

-- What each revision changed: an instance uuid, or NULL for topology (networks,
-- routers, ports). Old rows are pruned.
CREATE TABLE change_log (
    revision BIGINT NOT NULL,
    instance_uuid VARCHAR(36)
);
CREATE INDEX change_log_revision ON change_log (revision);

CREATE TABLE networks (
    id VARCHAR(128) PRIMARY KEY,
    project_id TEXT NOT NULL,
    name TEXT NOT NULL,
    mtu INTEGER NOT NULL
);

CREATE TABLE subnets (
    network_id VARCHAR(128) NOT NULL REFERENCES networks (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    cidr TEXT NOT NULL,
    gateway TEXT,
    dhcp BOOLEAN NOT NULL,
    dns TEXT NOT NULL,
    host_routes TEXT NOT NULL,
    ipv6_mode TEXT,
    PRIMARY KEY (network_id, seq)
);

CREATE TABLE routers (
    id VARCHAR(128) PRIMARY KEY,
    project_id TEXT NOT NULL
);

CREATE TABLE router_networks (
    router_id VARCHAR(128) NOT NULL REFERENCES routers (id) ON DELETE CASCADE,
    network_id VARCHAR(128) NOT NULL REFERENCES networks (id),
    seq INTEGER NOT NULL,
    PRIMARY KEY (router_id, network_id)
);
CREATE INDEX router_networks_network ON router_networks (network_id);

CREATE TABLE instances (
    uuid VARCHAR(36) PRIMARY KEY,
    name TEXT NOT NULL,
    hostname TEXT NOT NULL,
    project_id TEXT NOT NULL,
    availability_zone TEXT NOT NULL,
    region TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    image_id TEXT NOT NULL,
    launch_index INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    metadata_json TEXT NOT NULL,
    keys_json TEXT NOT NULL,
    user_data BYTEA,
    vendor_data_json TEXT,
    tags_json TEXT NOT NULL,
    security_groups_json TEXT NOT NULL,
    metadata_options_json TEXT,
    architecture TEXT NOT NULL
);

CREATE TABLE ports (
    instance_uuid VARCHAR(36) NOT NULL REFERENCES instances (uuid) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    id VARCHAR(128) NOT NULL,
    network_id VARCHAR(128) NOT NULL REFERENCES networks (id),
    mac VARCHAR(17) NOT NULL,
    device_number INTEGER NOT NULL,
    PRIMARY KEY (instance_uuid, seq)
);

-- network_id repeats the port's so the hot lookup (network, ip) -> instance is one
-- index probe. ip is the address in Python's normalized text form.
CREATE TABLE port_ips (
    instance_uuid VARCHAR(36) NOT NULL,
    port_seq INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    network_id VARCHAR(128) NOT NULL REFERENCES networks (id),
    ip VARCHAR(45) NOT NULL,
    PRIMARY KEY (instance_uuid, port_seq, seq),
    FOREIGN KEY (instance_uuid, port_seq) REFERENCES ports (instance_uuid, seq) ON DELETE CASCADE
);
CREATE INDEX port_ips_lookup ON port_ips (network_id, ip);

-- Nova's instance password, set once by the guest [openstack/nova api/metadata/password.py].
CREATE TABLE passwords (
    instance_uuid VARCHAR(36) PRIMARY KEY REFERENCES instances (uuid) ON DELETE CASCADE,
    password TEXT NOT NULL
);
