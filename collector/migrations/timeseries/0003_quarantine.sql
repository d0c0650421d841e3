-- Outcomes at the edges: what each ledger key carried, and the quarantine of healable refusals.

-- A digest of the frame each key carried: the same key with other content is a conflict (a
-- gateway's buffer rolled back and reissued the seq), never a duplicate. NULL for rows written
-- before this migration, which are treated as duplicates as before.
ALTER TABLE ingest_ledger ADD COLUMN digest bytea;
ALTER TABLE ingest_ledger ADD COLUMN quarantined integer NOT NULL DEFAULT 0;

-- Data kept with its reason until a replay stores it (or an operator purges it). kind:
-- 'readings' (payload msgpack [timestamps, values] of one device's metric), 'events' and
-- 'status' (payload msgpack list of wire entries), 'frame' (payload the raw frame as received).
CREATE TABLE quarantine (
    id            bigserial PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT now(),
    reason        text NOT NULL,
    message       text NOT NULL DEFAULT '',
    kind          text NOT NULL CHECK (kind IN ('readings', 'events', 'status', 'frame')),
    tenant_id     uuid NOT NULL,
    gateway_id    uuid NOT NULL,
    quota_scope   text NOT NULL CHECK (quota_scope IN ('tenant', 'unknown_gateway')),
    quota_id      uuid NOT NULL,
    stream        uuid,
    seq           bigint,
    device_id     uuid,
    metric        text,
    points        integer NOT NULL DEFAULT 0,
    first_time    timestamptz,
    last_time     timestamptz,
    bytes         integer NOT NULL,
    payload       bytea NOT NULL,
    replays       integer NOT NULL DEFAULT 0,
    last_replay   timestamptz
);
CREATE INDEX quarantine_tenant_received ON quarantine (tenant_id, received_at);
CREATE INDEX quarantine_gateway ON quarantine (gateway_id);
CREATE INDEX quarantine_device ON quarantine (device_id) WHERE device_id IS NOT NULL;
CREATE INDEX quarantine_reason ON quarantine (reason);

-- Bytes held in quarantine per quota scope, updated in the transaction that adds or removes rows.
CREATE TABLE quarantine_usage (
    scope  text NOT NULL,
    id     uuid NOT NULL,
    bytes  bigint NOT NULL DEFAULT 0,
    rows   bigint NOT NULL DEFAULT 0,
    -- Readings refused because the quota was full: counted, as the outcome table promises.
    refused_points bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, id)
);
