-- Credentials issued to gateways by `gateways provision` and `pki issue`: MQTT passwords (only
-- their Mosquitto hash is kept) and client certificates (the certificate, never its key).
-- `broker sync` writes the broker's password file, ACL and CRL from this table and `gateways`.
CREATE TABLE gateway_credentials (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    gateway_id         uuid NOT NULL,
    kind               text NOT NULL CHECK (kind IN ('password', 'certificate')),
    -- password: Mosquitto's PBKDF2-SHA512 form, $7$<iterations>$<salt>$<hash>
    password_hash      text,
    -- certificate: serial number (hex), PEM text, SHA-256 fingerprint and validity end
    serial             text UNIQUE,
    certificate        text,
    fingerprint        text,
    not_after          timestamptz,
    issued_at          timestamptz NOT NULL DEFAULT now(),
    issued_by          text NOT NULL DEFAULT '',
    revoked_at         timestamptz,
    revocation_reason  text,
    CHECK ((kind = 'password') = (password_hash IS NOT NULL)),
    CHECK ((kind = 'certificate') = (serial IS NOT NULL AND certificate IS NOT NULL))
);

CREATE INDEX gateway_credentials_gateway ON gateway_credentials (gateway_id);
-- At most one valid password per gateway: Mosquitto's password file has one line per user.
CREATE UNIQUE INDEX gateway_credentials_one_password ON gateway_credentials (gateway_id)
    WHERE kind = 'password' AND revoked_at IS NULL;
