"""The PKI commands and credential issuing, checked on the files they write (the broker's side
is tests/ops/test_broker_security.py)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.settings import load_settings
from tests.admin.conftest import Admin


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def registry(admin: Admin, tmp_path: Path) -> Admin:
    """A registry with tenant acme and gateway plant-1, and a CA in tmp_path/pki."""
    admin.run("tenants create acme")
    admin.run("gateways create plant-1 --tenant acme")
    admin.run(f"pki init --pki-dir {tmp_path / 'pki'}")
    return admin


def _gateway_id(admin: Admin, name: str = "plant-1") -> str:
    return str(admin.scalar("SELECT id::text FROM gateways WHERE name = $1", name))


def test_pki_init_writes_a_private_key_and_never_overwrites(admin: Admin, tmp_path: Path) -> None:
    """ca.key is 0600 and never printed; a second init is refused and changes nothing."""
    pki = tmp_path / "pki"
    out = admin.run(f"pki init --pki-dir {pki}").output
    key = (pki / "ca.key").read_text()
    assert (0o600, 0o644) == (_mode(pki / "ca.key"), _mode(pki / "ca.pem"))
    assert key.splitlines()[1] not in out
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "is never overwritten" in admin.fail(f"pki init --pki-dir {pki}")
    assert key == (pki / "ca.key").read_text()


def test_encrypted_ca_key_needs_its_passphrase(admin: Admin, tmp_path: Path) -> None:
    """--ca-passphrase-file encrypts the CA key; signing without it is refused with a clear
    message, with it works."""
    admin.run("tenants create acme")
    admin.run("gateways create plant-1 --tenant acme")
    phrase = tmp_path / "phrase"
    phrase.write_text("correct horse battery staple\n")
    admin.run(f"pki init --pki-dir {tmp_path / 'pki'} --ca-passphrase-file {phrase}")
    assert "ENCRYPTED" in (tmp_path / "pki/ca.key").read_text()
    issue = f"pki issue plant-1 --tenant acme --pki-dir {tmp_path / 'pki'} --out {tmp_path / 'gw'}"
    assert "the CA key is encrypted" in admin.fail(issue)
    admin.run(f"{issue} --ca-passphrase-file {phrase}")
    assert (tmp_path / "gw/gateway.pem").exists()


def test_csr_from_the_gateway_is_certified_for_the_registry_identity(
    registry: Admin, tmp_path: Path
) -> None:
    """A CSR made with openssl on the 'gateway' asking for another CN: the certificate has the
    gateway id as CN and the tenant id as OU, its key is the CSR's, and no key is written."""
    gateway_key = tmp_path / "gateway.key"
    csr = tmp_path / "plant-1.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=someone-else", "-keyout", str(gateway_key), "-out", str(csr)],
        check=True, capture_output=True,
    )  # fmt: skip
    out = tmp_path / "plant-1.toml"
    registry.run(
        f"gateways provision plant-1 --tenant acme --csr {csr} --pki-dir {tmp_path / 'pki'}"
        f" --output {out} --broker-host mqtt.example"
    )
    creds = tmp_path / "plant-1-credentials"
    assert {"gateway.pem", "ca.pem"} == {p.name for p in creds.iterdir()}
    cert = x509.load_pem_x509_certificate((creds / "gateway.pem").read_bytes())
    gateway = registry.query("SELECT id::text, tenant_id::text FROM gateways")[0]
    assert [gateway["id"]] == [
        a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    assert [gateway["tenant_id"]] == [
        a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(creds / "ca.pem"), "-purpose", "sslclient",
         str(creds / "gateway.pem")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert 0 == verify.returncode, verify.stdout + verify.stderr
    modulus = subprocess.run(
        ["openssl", "x509", "-noout", "-pubkey", "-in", str(creds / "gateway.pem")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    key_pub = subprocess.run(
        ["openssl", "pkey", "-pubout", "-in", str(gateway_key)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert key_pub == modulus
    settings = load_settings(out)
    assert (8883, True, None) == (
        settings.mqtt.port,
        settings.mqtt.tls.enabled,
        settings.mqtt.username,
    )
    assert Path("/etc/sensormine/credentials/gateway.key") == settings.mqtt.tls.key_file
    stored = registry.query("SELECT certificate, serial FROM gateway_credentials")[0]
    assert "PRIVATE" not in stored["certificate"]
    assert f"{cert.serial_number:X}" == stored["serial"]


def test_bad_csr_is_refused(registry: Admin, tmp_path: Path) -> None:
    """A file that is not a CSR, and a CSR whose signature was tampered with, are refused."""
    junk = tmp_path / "junk.csr"
    junk.write_text("not a request")
    base = f"pki issue plant-1 --tenant acme --pki-dir {tmp_path / 'pki'} --out {tmp_path / 'o'}"
    assert "not a certificate signing request" in registry.fail(f"{base} --csr {junk}")
    good = tmp_path / "good.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=x", "-keyout", str(tmp_path / "k"), "-outform", "DER",
         "-out", str(good)],
        check=True, capture_output=True,
    )  # fmt: skip
    data = bytearray(good.read_bytes())
    data[-5] ^= 0xFF  # inside the signature
    bad = tmp_path / "bad.csr"
    bad.write_bytes(bytes(data))
    message = registry.fail(f"{base} --csr {bad}")
    assert "signature" in message or "not a certificate signing request" in message
    assert 0 == registry.scalar("SELECT count(*) FROM gateway_credentials")


def test_password_provisioning_keeps_only_the_hash(registry: Admin, tmp_path: Path) -> None:
    """--credential password writes the password once (0600) and stores only its $7$ hash; a
    second provision supersedes the first."""
    out = tmp_path / "plant-1.toml"
    result = registry.run(
        f"gateways provision plant-1 --tenant acme --credential password --output {out}"
        f" --pki-dir {tmp_path / 'pki'}"
    )
    secret_file = tmp_path / "plant-1-credentials/mqtt-password"
    password = secret_file.read_text().strip()
    assert 0o600 == _mode(secret_file)
    assert 0o700 == _mode(secret_file.parent)
    assert password not in result.output
    rows = registry.query("SELECT password_hash, revoked_at FROM gateway_credentials")
    assert 1 == len(rows) and rows[0]["password_hash"].startswith("$7$101$")
    assert password not in rows[0]["password_hash"]
    settings = load_settings(out)
    assert (8884, _gateway_id(registry)) == (settings.mqtt.port, settings.mqtt.username)
    assert f"{secret_file} exists; add --force" in registry.fail(
        f"gateways provision plant-1 --tenant acme --credential password"
        f" --output {tmp_path / 'other.toml'} --credentials-dir {secret_file.parent}"
        f" --pki-dir {tmp_path / 'pki'}"
    )
    registry.run(
        f"gateways provision plant-1 --tenant acme --credential password --output {out} --force"
        f" --pki-dir {tmp_path / 'pki'}"
    )
    assert password != secret_file.read_text().strip()
    states = registry.query("SELECT revocation_reason FROM gateway_credentials ORDER BY issued_at")
    assert ["superseded", None] == [r["revocation_reason"] for r in states]


def test_crl_names_revoked_held_and_ceased_certificates(registry: Admin, tmp_path: Path) -> None:
    """pki crl: a revoked certificate with its reason, a disabled gateway's on hold, a deleted
    gateway's as ceased; enabling the gateway releases the hold."""
    pki = tmp_path / "pki"
    registry.run("gateways create plant-2 --tenant acme")
    registry.run("gateways create plant-3 --tenant acme")
    serials = {}
    for name in ("plant-1", "plant-2", "plant-3"):
        registry.run(f"pki issue {name} --tenant acme --pki-dir {pki} --out {tmp_path / name}")
        cert = x509.load_pem_x509_certificate((tmp_path / name / "gateway.pem").read_bytes())
        serials[name] = cert.serial_number
        assert 0o600 == _mode(tmp_path / name / "gateway.key")
    registry.run(f"pki revoke {serials['plant-1']:X} --reason key-compromise")
    registry.run("gateways disable plant-2 --tenant acme")
    registry.run("gateways delete plant-3 --tenant acme")

    def crl_reasons() -> dict[str, x509.ReasonFlags]:
        registry.run(f"pki crl --pki-dir {pki} --output {tmp_path / 'crl.pem'}")
        crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
        ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
        assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        names = {v: k for k, v in serials.items()}
        return {
            names[r.serial_number]: r.extensions.get_extension_for_class(
                x509.CRLReason
            ).value.reason
            for r in crl
        }

    assert {
        "plant-1": x509.ReasonFlags.key_compromise,
        "plant-2": x509.ReasonFlags.certificate_hold,
        "plant-3": x509.ReasonFlags.cessation_of_operation,
    } == crl_reasons()
    registry.run("gateways enable plant-2 --tenant acme")
    assert {"plant-1", "plant-3"} == set(crl_reasons())
    listed = registry.data("pki list --all")
    assert {"certificate"} == {r["kind"] for r in listed}
    assert not any("PRIVATE" in str(r) for r in listed)


def test_broker_sync_files_idempotent_and_with_a_crl_made_elsewhere(
    registry: Admin, tmp_path: Path
) -> None:
    """broker sync writes its files with their modes, changes nothing on a second run, takes a
    CRL made where the CA key is (--crl) without the key, refuses one of another CA, and serves
    password-only deployments with --cert-listen off."""
    pki, broker = tmp_path / "pki", tmp_path / "broker"
    registry.run(f"pki server-cert localhost --pki-dir {pki} --out {tmp_path / 'certs'}")
    registry.run(
        f"gateways provision plant-1 --tenant acme --credential password --pki-dir {pki}"
        f" --output {tmp_path / 'plant-1.toml'}"
    )
    (tmp_path / "collector-password").write_text("collector-secret\n")
    sync = (
        f"broker sync --no-reload --dir {broker} --server-cert {tmp_path / 'certs/broker.pem'}"
        f" --server-key {tmp_path / 'certs/broker.key'} --collector-password-file"
        f" {tmp_path / 'collector-password'} --json"
    )
    first = registry.data(f"{sync} --pki-dir {pki}")
    assert (1, 1, True) == (first["gateways"], first["with_password"], first["restart_needed"])
    modes = {p.name: _mode(p) for p in broker.iterdir()}
    assert {
        "gateways.passwd": 0o640,
        "collectors.passwd": 0o640,
        "acl": 0o640,
        "crl.pem": 0o644,
        "ca.pem": 0o644,
        "listeners.conf": 0o644,
    } == modes
    second = registry.data(f"{sync} --pki-dir {pki}")
    assert ([], False) == (second["changed"], second["restart_needed"])
    registry.run("tenants disable acme")
    tenant_off = registry.data(f"{sync} --pki-dir {pki}")
    assert (0, ["gateways.passwd", "acl"]) == (tenant_off["gateways"], tenant_off["changed"])
    assert _gateway_id(registry) not in (broker / "acl").read_text()
    registry.run("tenants enable acme")
    assert 1 == registry.data(f"{sync} --pki-dir {pki}")["gateways"]

    registry.run(f"pki crl --pki-dir {pki} --output {tmp_path / 'crl.pem'}")
    elsewhere = registry.data(
        f"{sync} --pki-dir {pki} --ca-key {tmp_path / 'absent.key'} --crl {tmp_path / 'crl.pem'}"
    )
    assert ["crl.pem"] == elsewhere["changed"]
    registry.run(f"pki init --pki-dir {tmp_path / 'other'}")
    registry.run(f"pki crl --pki-dir {tmp_path / 'other'} --output {tmp_path / 'other.pem'}")
    assert "is not signed by" in registry.fail(
        f"{sync} --pki-dir {pki} --crl {tmp_path / 'other.pem'}"
    )

    no_ca = tmp_path / "no-ca"
    assert "--cert-listen off" in registry.fail(f"{sync} --pki-dir {no_ca}")
    registry.data(f"{sync} --pki-dir {no_ca} --cert-listen off")
    listeners = (broker / "listeners.conf").read_text()
    assert "require_certificate true" not in listeners and "listener 8884" in listeners
