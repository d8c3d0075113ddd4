"""The only module that touches OpenSSL: server contexts and the self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import CertificateOptions, TLSVersion

from mailgate.errors import ConfigError
from mailgate.fileio import write_all


def make_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """Write a self-signed certificate for ``hostname``, localhost and 127.0.0.1.

    The key is written first with mode 0600, both files atomically, so a crash leaves either
    nothing or a complete pair.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailgate self-signed"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_certificate(cert_path: Path, key_path: Path, hostname: str) -> bool:
    """Create the self-signed pair unless it exists; True when it was created."""
    if cert_path.exists() and key_path.exists():
        return False
    make_self_signed(cert_path, key_path, hostname)
    return True


def server_context(cert_path: Path, key_path: Path) -> CertificateOptions:
    """A TLS 1.2+ server context from PEM files (the cert file may carry the chain)."""
    try:
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except OSError as e:
        raise ConfigError(f"TLS: cannot read {e.filename}: {e.strerror}") from e
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        chain = [x509.load_pem_x509_certificate(b) for b in _pem_blocks(cert_pem, b"CERTIFICATE")]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"TLS: {cert_path} or {key_path} is not valid PEM") from e
    if not chain:
        raise ConfigError(f"TLS: no certificate in {cert_path}")
    # pyOpenSSL now wants cryptography objects (its own are deprecated); Twisted's stubs lag.
    return CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=chain[1:],  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def _pem_blocks(data: bytes, kind: bytes) -> list[bytes]:
    begin = b"-----BEGIN " + kind + b"-----"
    end = b"-----END " + kind + b"-----"
    blocks = []
    start = data.find(begin)
    while start != -1:
        stop = data.find(end, start)
        if stop == -1:
            break
        stop += len(end)
        blocks.append(data[start:stop] + b"\n")
        start = data.find(begin, stop)
    return blocks
