"""A private CA and a serving certificate for 127.0.0.1, for TLS test servers.

The same certificate recipe as the real control plane (`control_plane._cert`): RSA 2048,
SHA-256, valid for two days, SANs localhost and 127.0.0.1. Nothing is trusted system-wide:
a client trusts the CA only when given `ca_pem` / `ca_file`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from control_plane import _cert, _key, _name, _pem_key


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca_file: Path  # the CA certificate (PEM): what clients trust
    cert_file: Path  # the server's certificate (PEM), signed by the CA
    key_file: Path  # the server's private key (PEM, unencrypted, mode 0600)

    @property
    def ca_pem(self) -> str:
        return self.ca_file.read_text()


def make_tls_files(directory: Path, *, common_name: str = "zenml-test-server") -> TlsFiles:
    """Write a fresh CA and a server certificate for 127.0.0.1/localhost into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name(f"{common_name}-ca")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    server_key = _key()
    server = _cert(_name(common_name), server_key, ca_name, ca_key, server=True)

    def write(name: str, data: bytes, mode: int = 0o644) -> Path:
        path = directory / name
        path.write_bytes(data)
        path.chmod(mode)
        return path

    pem = serialization.Encoding.PEM
    return TlsFiles(
        ca_file=write("ca.crt", ca.public_bytes(pem)),
        cert_file=write("server.crt", server.public_bytes(pem)),
        key_file=write("server.key", _pem_key(server_key), 0o600),
    )
