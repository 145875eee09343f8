"""`fksroute certs DIR`: a small CA and the certificates for mutual TLS between the daemon and its agents."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 825
AGENT_CN = "fksroute-agent"
DAEMON_CN = "fksroute-daemon"

# Which file goes where; the README repeats this table.
FILES = {
    "ca.pem": "both machines: the CA that signs both sides",
    "ca.key": "neither: keep it offline; needed only to issue new certificates",
    "agent.pem": "Windows agent: --cert",
    "agent.key": "Windows agent: --key",
    "daemon.pem": "daemon: agent.cert in routes.yaml",
    "daemon.key": "daemon: agent.key in routes.yaml",
}


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fksroute"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _subject_alt_names(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            # Backdated a little so that a peer whose clock runs behind still accepts it.
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))


def make_ca(days: int = DEFAULT_DAYS, common_name: str = "fksroute CA") -> _Issued:
    """A self-signed CA that may sign end-entity certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (_builder(name, name, key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _Issued(cert, key)


def issue(ca: _Issued, common_name: str, *, server_hosts: Iterable[str] | None = None,
          days: int = DEFAULT_DAYS) -> _Issued:
    """A certificate signed by `ca`: a TLS server's when `server_hosts` is given, else a TLS client's."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts is not None else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(_name(common_name), ca.cert.subject, key, days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    if server_hosts is not None:
        builder = builder.add_extension(_subject_alt_names(server_hosts), critical=False)
    return _Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write(path: Path, data: bytes, private: bool) -> None:
    # Keys are created 0600 from the start rather than chmod-ed after being written.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_certificates(directory: Path, hosts: Iterable[str] = DEFAULT_HOSTS, days: int = DEFAULT_DAYS,
                       overwrite: bool = False) -> dict[str, Path]:
    """Create ca.pem/ca.key, agent.pem/agent.key (server, SAN = `hosts`) and daemon.pem/daemon.key (client) in `directory`."""
    directory = Path(directory)
    hosts = tuple(hosts) or DEFAULT_HOSTS
    paths = {name: directory / name for name in FILES}
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{directory} already holds {', '.join(sorted(existing))} (use --force to replace)")
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(days)
    agent = issue(ca, AGENT_CN, server_hosts=hosts, days=days)
    daemon = issue(ca, DAEMON_CN, days=days)
    for stem, issued in (("ca", ca), ("agent", agent), ("daemon", daemon)):
        _write(paths[f"{stem}.pem"], _cert_pem(issued.cert), private=False)
        _write(paths[f"{stem}.key"], _key_pem(issued.key), private=True)
    return paths
