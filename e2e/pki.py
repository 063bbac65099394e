"""Throw-away PKI for a loopback control plane: CAs, the apiserver serving cert, client certs, SA key.

EC P-256 keys keep generation in the milliseconds; kube-apiserver accepts them for TLS and ES256 tokens.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=7)
SERVICE_IP = "10.0.0.1"
"""First address of the apiserver's ``--service-cluster-ip-range``: the in-cluster ``kubernetes`` Service."""
FRONT_PROXY_CLIENT = "front-proxy-client"
"""Without a request-header CA, every delegating component (kube-scheduler) logs errors about its absence."""

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class CertPair:
    """PEM files of a certificate and its key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Every file the control plane needs, all under one directory."""

    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    scheduler: CertPair
    front_proxy_ca: CertPair
    front_proxy_client: CertPair
    sa_key: Path
    sa_pub: Path


def _key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: Key, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)


def _name(common_name: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_encipherment=not ca,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _ca(common_name: str) -> tuple[x509.Certificate, Key]:
    key = _key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, Key],
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, Key]:
    ca_cert, ca_key = ca
    key = _key()
    builder = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _store(directory: Path, name: str, pair: tuple[x509.Certificate, Key]) -> CertPair:
    cert, key = pair
    files = CertPair(cert=directory / f"{name}.crt", key=directory / f"{name}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, files.key)
    return files


def _apiserver_sans() -> list[x509.GeneralName]:
    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    dns.append("kubernetes.default.svc.cluster.local")
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1", SERVICE_IP)]
    return sans


def generate(directory: Path) -> Pki:
    """Write a complete PKI into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("kube-gpu-extender-e2e-ca")
    proxy_ca = _ca("kube-gpu-extender-e2e-front-proxy-ca")
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    sa_key = _key()
    sa_key_path, sa_pub_path = directory / "sa.key", directory / "sa.pub"
    _write_key(sa_key, sa_key_path)
    sa_pub_path.write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return Pki(
        ca=_store(directory, "ca", ca),
        apiserver=_store(
            directory,
            "apiserver",
            _leaf(ca, _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, _apiserver_sans()),
        ),
        admin=_store(directory, "admin", _leaf(ca, _name("kubernetes-admin", "system:masters"), client)),
        scheduler=_store(directory, "scheduler", _leaf(ca, _name("system:kube-scheduler"), client)),
        front_proxy_ca=_store(directory, "front-proxy-ca", proxy_ca),
        front_proxy_client=_store(directory, "front-proxy-client", _leaf(proxy_ca, _name(FRONT_PROXY_CLIENT), client)),
        sa_key=sa_key_path,
        sa_pub=sa_pub_path,
    )
