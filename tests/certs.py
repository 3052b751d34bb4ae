"""A throw-away test CA with a server certificate for 127.0.0.1/localhost and a client certificate."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool, sans=None, eku=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_test_pki(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("cv-worker test CA", ca_key, None, ca_key, ca=True)
    srv_key = _key()
    srv = _cert("localhost", srv_key, ca.subject, ca_key, ca=False,
                sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    cli_key = _key()
    cli = _cert("node-tls", cli_key, ca.subject, ca_key, ca=False, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    paths = {name: out / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    paths["ca.pem"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server.pem"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    _write_key(srv_key, paths["server.key"])
    paths["client.pem"].write_bytes(cli.public_bytes(serialization.Encoding.PEM))
    _write_key(cli_key, paths["client.key"])
    return paths
