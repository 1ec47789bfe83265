"""HTTPS webhooks: the attempt connects to the address it checked (no second lookup can
swap it), and TLS still verifies the URL's name, sent as the server name (SNI) and Host."""

from __future__ import annotations

import ssl
from datetime import timedelta

import httpx

from tests.webhook_receiver import receiver
from tuneq.db import utcnow
from tuneq.settings import Settings
from tuneq.webhooks.delivery import Claimed, send
from tuneq.webhooks.targets import check_target


def _self_signed(directory, name):
    """A certificate for `name` and its key, as PEM files, made here (no network)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = utcnow()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert, private = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, private


def test_https_goes_to_the_checked_address_with_the_name_verified(tmp_path):
    """The attempt connects to the address it checked, yet TLS still checks the URL's name:
    the name is the server name (SNI) and the Host header."""
    settings = Settings(webhook_allow_private=True)
    address = str(check_target("https://localhost/", settings).address)
    cert, key = _self_signed(tmp_path, "localhost")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trusting = httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), trust_env=False)
    with receiver(host=address, tls=server_tls) as hook, trusting:
        port = hook.url.rsplit(":", 1)[1].split("/")[0]
        for name, expected in (("localhost", 200), (address, None)):
            url = f"https://{name}:{port}/hook"
            claimed = Claimed("msg-tls", 1, url, "whsec_" + "A" * 44, '{"type":"job.succeeded"}')
            outcome = send(claimed, settings, trusting)
            assert outcome.status_code == expected, outcome.error
        # by its address the certificate (made out to localhost) does not match
        assert "CERTIFICATE_VERIFY_FAILED" in outcome.error
        assert [r.headers["host"] for r in hook.received] == [f"localhost:{port}"]
