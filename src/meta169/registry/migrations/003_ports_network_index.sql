-- meta169 registry schema 3: find the ports on a network through an index.
--
-- Removing a network first asks which instances still have ports on it; without
-- this index that is a scan of every port (100,000 rows for a large registry) for
-- each network a prune removes. The lookup of a caller, (network, ip) -> instance,
-- already has port_ips_lookup (schema 1).
CREATE INDEX ports_network ON ports (network_id);
