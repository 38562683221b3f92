"""Federation PKI: a CA, server and client certificates (role in the OU), gRPC credentials and peer identity.

Layout of a TLS directory made by `fedfhe-certs`:
    ca.pem                  the federation CA certificate (trust anchor of every party)
    ca.key                  its private key (0600; keep it offline in a real deployment)
    server.pem, server.key  the certificate every service presents (SANs: --hosts)
    <name>.pem, <name>.key  a client certificate per worker ("worker") and the operator ("operator")
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import Unauthenticated

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER = "server"
ROLES = ("worker", "operator", "service")
_VALIDITY = dt.timedelta(days=365)


class TlsError(ValueError):
    """Missing or unusable TLS material; the message names the file."""


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file that is 0600 from its first byte (never world-readable, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing file
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str, role: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfhe federation"),
             x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if role:
        attrs.insert(1, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    return x509.Name(attrs)


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def create_ca(directory: Path, *, force: bool = False) -> Authority:
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_KEY).exists() and not force:
        raise TlsError(f"{directory / CA_KEY} exists: refusing to replace a federation CA (use --force)")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name("fedfhe federation CA"))
        .issuer_name(_name("fedfhe federation CA")).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + 10 * _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(directory / CA_KEY, _key_pem(key))
    (directory / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(cert, key)


def load_ca(directory: Path) -> Authority:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise TlsError(f"missing {exc.filename}: run fedfhe-certs first") from None
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Authority(cert, key)


def issue(ca: Authority, directory: Path, name: str, *, role: str, hosts: list[str] | None = None) -> Path:
    """Issue `<name>.pem/.key`: a server certificate when hosts is given, else a client one."""
    if role not in ROLES:
        raise TlsError(f"unknown role {role!r}; one of {ROLES}")
    check_name(name, allow_reserved=name == SERVER and bool(hosts))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder().subject_name(_name(name, role)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    write_private(directory / f"{name}.key", _key_pem(key))
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


_RESERVED = {"ca", SERVER}


def check_name(name: str, *, allow_reserved: bool = False) -> str:
    """A certificate name is a plain file stem; `ca` and `server` belong to the federation itself."""
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise TlsError(f"certificate name {name!r} must be 1-64 letters, digits, '-' or '_'")
    if name.lower() in _RESERVED and not allow_reserved:
        raise TlsError(f"certificate name {name!r} is reserved for the federation's own files")
    return name


def _read(directory: Path, name: str) -> bytes:
    path = directory / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"missing {path}: run fedfhe-certs {directory}") from None


def server_credentials(directory: Path) -> grpc.ServerCredentials:
    """Server identity plus mandatory client certificates signed by the federation CA."""
    return grpc.ssl_server_credentials(
        [(_read(directory, f"{SERVER}.key"), _read(directory, f"{SERVER}.pem"))],
        root_certificates=_read(directory, CA_CERT), require_client_auth=True,
    )


def channel_credentials(directory: Path, identity: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(directory, CA_CERT),
        private_key=_read(directory, f"{identity}.key"),
        certificate_chain=_read(directory, f"{identity}.pem"),
    )


@dataclass(frozen=True)
class PeerIdentity:
    name: str
    role: str


def peer_identity(context: Any) -> PeerIdentity:
    """The verified client certificate's CN and role (OU); Unauthenticated without one."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise Unauthenticated("no verified client certificate on this call")
    cert = x509.load_pem_x509_certificate(pems[0])
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return PeerIdentity(name=str(cn[0].value) if cn else "", role=str(ou[0].value) if ou else "")
