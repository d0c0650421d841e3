-- Tokens of the query API (`sensormine-collector tokens create|list|revoke`). A token is 32
-- random bytes: only its SHA-256 is kept (a slow hash adds nothing against a secret of that
-- strength), with the first characters for an operator to recognise it. Each token reads one
-- tenant; a revoked token is refused at its next request (the API checks every request here).
CREATE TABLE api_tokens (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id     uuid NOT NULL,
    name          text NOT NULL,
    token_prefix  text NOT NULL,
    token_sha256  bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL DEFAULT '',
    expires_at    timestamptz,
    revoked_at    timestamptz,
    CHECK (name <> ''),
    CHECK (octet_length(token_sha256) = 32)
);
CREATE INDEX api_tokens_tenant ON api_tokens (tenant_id);
CREATE UNIQUE INDEX api_tokens_name ON api_tokens (tenant_id, name) WHERE revoked_at IS NULL;
