"""Registry administration: the metadata database's tenants, gateways, schemas, device types,
devices and alert rules, gateway provisioning and seed data (``sensormine-collector`` commands)."""
