-- Alerts (docs/alerts.md): the state of every (rule, series), the alerts raised and cleared,
-- and the outbox of transitions to publish. All written in the writer's transaction.

-- One row per (rule, series) the rule has seen. level: ok, pending, firing, resolving.
-- checkpoints: [[time µs, raised_at µs or null], ...], times at which the state follows from
-- the open alert alone; out-of-order readings are evaluated again from the one before them
-- (collector/alerts/evaluator.py); those that cannot be are counted in skipped.
CREATE TABLE alert_state (
    rule_id      uuid NOT NULL,
    series_id    integer NOT NULL,
    tenant_id    uuid NOT NULL,
    gateway_id   uuid NOT NULL,
    device_id    uuid NOT NULL,
    rule_digest  text NOT NULL,
    level        text NOT NULL DEFAULT 'ok'
                 CHECK (level IN ('ok', 'pending', 'firing', 'resolving')),
    since        timestamptz,
    last_time    timestamptz,
    last_value   double precision,
    checkpoints  jsonb NOT NULL DEFAULT '[]',
    raised_at    timestamptz,
    evaluated    bigint NOT NULL DEFAULT 0,
    skipped      bigint NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, series_id)
);

-- Open (cleared_at NULL) and closed alerts; at most one open per (rule, series).
CREATE TABLE alerts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id         uuid NOT NULL,
    rule_name       text NOT NULL,
    tenant_id       uuid NOT NULL,
    gateway_id      uuid NOT NULL,
    device_id       uuid NOT NULL,
    series_id       integer NOT NULL,
    metric          text NOT NULL,
    severity        text NOT NULL,
    condition       text NOT NULL,
    threshold       double precision,
    raised_at       timestamptz NOT NULL,
    raised_value    double precision,
    raised_late     boolean NOT NULL DEFAULT false,
    cleared_at      timestamptz,
    cleared_value   double precision,
    cleared_late    boolean NOT NULL DEFAULT false,
    clear_reason    text,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (rule_id, series_id, raised_at)
);
CREATE UNIQUE INDEX alerts_open ON alerts (rule_id, series_id) WHERE cleared_at IS NULL;
CREATE INDEX alerts_tenant_time ON alerts (tenant_id, raised_at DESC);
CREATE INDEX alerts_device_time ON alerts (device_id, raised_at DESC);

-- Transitions committed and not yet published on {prefix}/v1/{tenant}/alerts.
CREATE TABLE alert_outbox (
    id          bigserial PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
