-- Time-series database: hypertables partitioned by time, and the collector's bookkeeping.
-- The chunk interval comes from the collector's setting timeseries.chunk_interval, passed to
-- this script as the session setting sensormine.chunk_interval (default 1 day).

CREATE EXTENSION IF NOT EXISTS timescaledb;

-- One row per reading. Numbers and booleans (1/0) go to value, strings to value_text.
CREATE TABLE telemetry (
    time        timestamptz NOT NULL,
    tenant_id   uuid NOT NULL,
    device_id   uuid NOT NULL,
    metric      text NOT NULL,
    value       double precision,
    value_text  text
);
-- No default time index: every query names a device, and each index costs COPY throughput.
SELECT create_hypertable('telemetry', 'time',
    chunk_time_interval => coalesce(nullif(current_setting('sensormine.chunk_interval', true), ''), '1 day')::interval,
    create_default_indexes => false);
-- One device's metric over a time range, and the latest value of a device's metric.
CREATE INDEX telemetry_device_metric_time ON telemetry (device_id, metric, time DESC);
-- Latest readings per device, whatever the metric.
CREATE INDEX telemetry_device_time ON telemetry (device_id, time DESC);

CREATE TABLE events (
    time        timestamptz NOT NULL,
    tenant_id   uuid NOT NULL,
    gateway_id  uuid NOT NULL,
    device_id   uuid,
    severity    text NOT NULL,
    kind        text NOT NULL,
    message     text NOT NULL DEFAULT '',
    attributes  jsonb NOT NULL DEFAULT '{}'::jsonb
);
SELECT create_hypertable('events', 'time',
    chunk_time_interval => coalesce(nullif(current_setting('sensormine.chunk_interval', true), ''), '1 day')::interval);
CREATE INDEX events_gateway_time ON events (gateway_id, time DESC);
CREATE INDEX events_device_time ON events (device_id, time DESC) WHERE device_id IS NOT NULL;

-- Rollups (filled by the lifecycle jobs): one row per bucket of one period width.
CREATE TABLE metrics (
    bucket     timestamptz NOT NULL,
    period     interval NOT NULL,
    tenant_id  uuid NOT NULL,
    device_id  uuid NOT NULL,
    metric     text NOT NULL,
    count      bigint NOT NULL,
    sum        double precision,
    min        double precision,
    max        double precision,
    last       double precision
);
SELECT create_hypertable('metrics', 'bucket',
    chunk_time_interval => coalesce(nullif(current_setting('sensormine.chunk_interval', true), ''), '1 day')::interval * 7,
    create_default_indexes => false);
-- The key of the idempotent upsert; a unique index on a hypertable must hold the time column.
CREATE UNIQUE INDEX metrics_key ON metrics (period, device_id, metric, bucket);
CREATE INDEX metrics_device_metric_bucket ON metrics (device_id, metric, period, bucket DESC);

-- Gateway rows have device_id NULL; device rows name both.
CREATE TABLE device_status_history (
    time        timestamptz NOT NULL,
    tenant_id   uuid NOT NULL,
    gateway_id  uuid NOT NULL,
    device_id   uuid,
    status      text NOT NULL,
    reason      text NOT NULL DEFAULT ''
);
SELECT create_hypertable('device_status_history', 'time',
    chunk_time_interval => coalesce(nullif(current_setting('sensormine.chunk_interval', true), ''), '1 day')::interval * 7,
    create_default_indexes => false);
CREATE INDEX device_status_history_device_time ON device_status_history (device_id, time DESC);
CREATE INDEX device_status_history_gateway_time ON device_status_history (gateway_id, time DESC);

-- One row per batch ever written, inserted in the same transaction as the batch's rows:
-- the key that makes redelivery harmless.
CREATE TABLE ingest_ledger (
    gateway_id   uuid NOT NULL,
    stream       uuid NOT NULL,
    seq          bigint NOT NULL,
    tenant_id    uuid NOT NULL,
    result       text NOT NULL,
    accepted     integer NOT NULL DEFAULT 0,
    rejected     integer NOT NULL DEFAULT 0,
    reason       text NOT NULL DEFAULT '',
    created      timestamptz,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, stream, seq)
);
CREATE INDEX ingest_ledger_gateway_received ON ingest_ledger (gateway_id, received_at DESC);
CREATE INDEX ingest_ledger_received ON ingest_ledger (received_at);

CREATE TABLE ingest_rejects (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    reason       text NOT NULL,
    message      text NOT NULL DEFAULT '',
    topic        text NOT NULL DEFAULT '',
    tenant_id    uuid,
    gateway_id   uuid,
    stream       uuid,
    seq          bigint,
    device_id    uuid,
    metric       text,
    points       integer NOT NULL DEFAULT 0,
    sample       jsonb NOT NULL DEFAULT '[]'::jsonb
);
CREATE INDEX ingest_rejects_received ON ingest_rejects (received_at);
CREATE INDEX ingest_rejects_reason_received ON ingest_rejects (reason, received_at);

-- What each committed flush wrote, per device, metric and hour: the rollup jobs recompute
-- exactly these ranges and delete the rows they have handled (written in the flush's
-- transaction, so no written reading can be missed by the rollups).
CREATE TABLE ingest_dirty (
    id          bigserial PRIMARY KEY,
    flushed_at  timestamptz NOT NULL DEFAULT now(),
    tenant_id   uuid NOT NULL,
    device_id   uuid NOT NULL,
    metric      text NOT NULL,
    first_time  timestamptz NOT NULL,
    last_time   timestamptz NOT NULL
);
CREATE INDEX ingest_dirty_flushed ON ingest_dirty (flushed_at);
