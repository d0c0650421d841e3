-- The latest backlog figures of each gateway, from its status frames (at connect and while a
-- backlog drains): what its buffer holds and how fast it drains. One row per gateway, replaced
-- by newer figures only (frames may arrive out of order).
CREATE TABLE gateway_backlog (
    gateway_id       uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL,
    time             timestamptz NOT NULL,
    readings         bigint NOT NULL,
    batches          bigint NOT NULL,
    oldest_age_s     double precision,
    ack_rate         double precision NOT NULL,
    production_rate  double precision NOT NULL,
    drain_s          double precision,
    draining         boolean NOT NULL
);
