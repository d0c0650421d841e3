-- Alert evaluation in each gateway stream's own order (docs/alerts.md, "Out-of-order batches").
-- evaluated_seq: the newest batch of the stream whose readings the rules have seen; a batch
-- that arrives before its predecessor waits in alert_parked (committed with its readings) until
-- the predecessor's flush evaluates both, or alerts.park_timeout passes.
CREATE TABLE alert_streams (
    gateway_id     uuid NOT NULL,
    stream         uuid NOT NULL,
    evaluated_seq  bigint NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, stream)
);

CREATE TABLE alert_parked (
    gateway_id  uuid NOT NULL,
    stream      uuid NOT NULL,
    seq         bigint NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    -- msgpack: [[tenant_id bytes, device_id bytes, metric, series_id, [times], [values]], ...]
    payload     bytea NOT NULL,
    PRIMARY KEY (gateway_id, stream, seq)
);
