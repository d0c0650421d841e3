-- The lifecycle jobs' shared schedule: one row per job, read and written under the job's
-- advisory lock, so that collectors agree on when a job last ran, across restarts.
CREATE TABLE lifecycle_jobs (
    job            text PRIMARY KEY,
    last_started   timestamptz,
    last_finished  timestamptz,
    last_result    text NOT NULL DEFAULT 'never' CHECK (last_result IN ('never', 'running', 'ok', 'error')),
    last_error     text NOT NULL DEFAULT '',
    last_detail    jsonb NOT NULL DEFAULT '{}'::jsonb,
    last_runner    text NOT NULL DEFAULT '',
    runs           bigint NOT NULL DEFAULT 0
);
