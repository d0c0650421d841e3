-- Registry of the metadata database: who owns what, and what a device may send.
-- No foreign keys, here or between the two databases (the seed's decision): every reference is
-- a UUID that the application checks (`sensormine-collector` refuses a device type naming a
-- schema that does not exist, a device of another tenant's type, and a delete that would leave
-- something pointing at nothing). So "foreign key constraint violation" cannot come from us,
-- and schemas, device types and devices can be managed, backed up and restored on their own.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE,
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid NOT NULL,
    email         text NOT NULL,
    display_name  text NOT NULL DEFAULT '',
    role          text NOT NULL DEFAULT 'viewer' CHECK (role IN ('admin', 'operator', 'viewer')),
    enabled       boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, email)
);

CREATE TABLE gateways (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL,
    name         text NOT NULL,
    description  text NOT NULL DEFAULT '',
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE schemas (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL,
    name         text NOT NULL,
    description  text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

-- The current version of a schema is the one with the highest version number.
CREATE TABLE schema_versions (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    schema_id    uuid NOT NULL,
    version      integer NOT NULL CHECK (version > 0),
    json_schema  jsonb NOT NULL,
    created_by   text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (schema_id, version)
);

CREATE TABLE device_types (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL,
    name         text NOT NULL,
    description  text NOT NULL DEFAULT '',
    schema_id    uuid,  -- no foreign key: checked by the application
    version      integer NOT NULL DEFAULT 1,
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE INDEX device_types_schema_id ON device_types (schema_id);

CREATE TABLE device_type_versions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    device_type_id  uuid NOT NULL,
    version         integer NOT NULL,
    snapshot        jsonb NOT NULL,
    created_by      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_type_id, version)
);

CREATE TABLE device_type_audit_logs (
    id              bigserial PRIMARY KEY,
    device_type_id  uuid NOT NULL,
    tenant_id       uuid NOT NULL,
    actor           text NOT NULL DEFAULT '',
    action          text NOT NULL,
    changes         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_type_audit_logs_type_time ON device_type_audit_logs (device_type_id, created_at DESC);

CREATE TABLE devices (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL,
    device_type_id  uuid NOT NULL,
    gateway_id      uuid,
    name            text NOT NULL,
    description     text NOT NULL DEFAULT '',
    attributes      jsonb NOT NULL DEFAULT '{}'::jsonb,
    enabled         boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE INDEX devices_gateway_id ON devices (gateway_id);
CREATE INDEX devices_device_type_id ON devices (device_type_id);

CREATE TABLE alert_rules (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL,
    name            text NOT NULL,
    device_type_id  uuid,
    device_id       uuid,
    metric          text NOT NULL,
    condition       text NOT NULL CHECK (condition IN ('>', '>=', '<', '<=', '==', '!=')),
    threshold       double precision NOT NULL,
    duration        interval NOT NULL DEFAULT '0 seconds',
    severity        text NOT NULL DEFAULT 'warning'
                    CHECK (severity IN ('info', 'warning', 'error', 'critical')),
    enabled         boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

-- Collectors cache the registry and drop an entry when it changes: the payload is
-- '<table>:<id>' where id is the row's key for the cache (schema_id for schema_versions).
CREATE FUNCTION sensormine_registry_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    key_column text := TG_ARGV[0];
    old_key text;
    new_key text;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_key := to_jsonb(OLD) ->> key_column;
        PERFORM pg_notify('sensormine_registry', TG_TABLE_NAME || ':' || old_key);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_key := to_jsonb(NEW) ->> key_column;
        IF old_key IS DISTINCT FROM new_key THEN
            PERFORM pg_notify('sensormine_registry', TG_TABLE_NAME || ':' || new_key);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER gateways_notify AFTER INSERT OR UPDATE OR DELETE ON gateways
    FOR EACH ROW EXECUTE FUNCTION sensormine_registry_notify('id');
CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION sensormine_registry_notify('id');
CREATE TRIGGER device_types_notify AFTER INSERT OR UPDATE OR DELETE ON device_types
    FOR EACH ROW EXECUTE FUNCTION sensormine_registry_notify('id');
CREATE TRIGGER schema_versions_notify AFTER INSERT OR UPDATE OR DELETE ON schema_versions
    FOR EACH ROW EXECUTE FUNCTION sensormine_registry_notify('schema_id');
CREATE TRIGGER tenants_notify AFTER UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION sensormine_registry_notify('id');
