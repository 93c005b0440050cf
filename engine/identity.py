"""Node identity: a private key and a self-signed certificate per node, named by its fingerprint.

A node ID is the SHA-256 of the certificate (DER), in base32 without padding, in groups of four:
``ABCD-EFGH-...`` (52 characters). Each side pins the other's ID in its config; nothing else is trusted.
The ID is printed by ``standby init`` and is safe to share: it names a key, it does not grant anything.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigError
from engine.model import node_id

KEY_FILE = "node.key"
CERT_FILE = "node.crt"


@dataclass(frozen=True)
class Identity:
    cert_path: Path
    key_path: Path
    cert_der: bytes

    @property
    def id(self) -> str:
        return node_id(self.cert_der)


def load(state_dir: Path) -> Identity:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{state_dir}: no node identity; run `standby init --config FILE` on this server first"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{cert_path}: not a PEM certificate: {e}") from None
    if not key_path.exists():
        raise ConfigError(f"{key_path}: the private key is missing")
    return Identity(cert_path, key_path, cert.public_bytes(Encoding.DER))


def create(state_dir: Path, name: str, force: bool = False) -> tuple[Identity, bool]:
    """Create the key and certificate if missing (or with ``force``, replace them: a key rotation).
    Returns the identity and whether it was created now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    state_dir.mkdir(parents=True, exist_ok=True)
    if (state_dir / CERT_FILE).exists() and not force:
        return load(state_dir), False
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"standby {name}"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * 30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path = state_dir / KEY_FILE
    tmp = key_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    if sys.platform != "win32":
        os.chmod(tmp, 0o600)
    os.replace(tmp, key_path)
    cert_tmp = state_dir / (CERT_FILE + ".tmp")
    cert_tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(cert_tmp, state_dir / CERT_FILE)
    return load(state_dir), True
