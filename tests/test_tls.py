"""`server.tls`: fksroute terminates HTTPS itself and, when asked, serves only clients with a
certificate from `client_ca` (as TradingView presents one). Certificates are made here."""

import datetime as dt
import ipaddress
import ssl

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from serving import Daemon, write_routes

ALERT = {"symbol": "BTC/USDT", "action": "buy", "order_type": "market", "quantity": 0.01}


class Authority:
    """A throw-away CA that writes PEM files into a directory."""

    def __init__(self, directory, name):
        self.directory, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (self._builder(subject, subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = directory / f"{name}.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject, issuer, public_key):
        now = dt.datetime.now(dt.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))

    def issue(self, name, server):
        """(cert path, key path) for a server on 127.0.0.1 or a client named `name`."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TradingView, Inc."),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (self._builder(subject, self.cert.subject, key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


@pytest.fixture
def pki(tmp_path):
    server_ca = Authority(tmp_path, "server-ca")
    client_ca = Authority(tmp_path, "client-ca")
    stranger_ca = Authority(tmp_path, "stranger-ca")
    return {
        "server_ca": server_ca, "client_ca": client_ca,
        "server": server_ca.issue("server", server=True),
        "client": client_ca.issue("TradingView Webhooks", server=False),
        "stranger": stranger_ca.issue("stranger", server=False),
    }


def context(pki, client=None):
    ctx = ssl.create_default_context(cafile=str(pki["server_ca"].pem))
    if client is not None:
        ctx.load_cert_chain(*map(str, pki[client]))
    return ctx


def serve_tls(directory, tls, ctx):
    """A real `fksroute serve` with `server.tls`, reached over https with `ctx`."""
    routes = write_routes(directory, f"""
        version: 1
        server: {{tls: {tls}}}
        plugins: {{paper: {{type: paper}}}}
        routes: [{{name: all, to: paper}}]
    """)
    daemon = Daemon(routes)
    daemon.client.close()
    daemon.url = f"https://127.0.0.1:{daemon.port}"
    daemon.client = httpx.Client(base_url=daemon.url, timeout=10, verify=ctx)
    try:
        return daemon.wait_ready()
    except Exception:
        daemon.stop()
        raise


def test_https_is_served_with_the_configured_certificate(tmp_path, pki):
    cert, key = pki["server"]
    daemon = serve_tls(tmp_path, f"{{cert: {cert.name}, key: {key.name}}}", context(pki))
    try:
        r = daemon.post(json=ALERT)
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "filled"
        with pytest.raises(httpx.TransportError):          # plain HTTP is not spoken on that port
            httpx.get(f"http://127.0.0.1:{daemon.port}/-/healthy", timeout=5)
        with pytest.raises(httpx.ConnectError):            # and a client that does not trust it stops
            httpx.get(f"{daemon.url}/-/healthy", timeout=5, verify=ssl.create_default_context())
        assert daemon.get("/-/healthy").status_code == 200
    finally:
        daemon.stop()


def test_with_require_client_cert_only_clients_of_client_ca_are_served(tmp_path, pki):
    cert, key = pki["server"]
    tls = f"{{cert: {cert.name}, key: {key.name}, client_ca: client-ca.pem, require_client_cert: true}}"
    daemon = serve_tls(tmp_path, tls, context(pki, "client"))
    try:
        r = daemon.post(json=ALERT)
        assert r.status_code == 200 and r.json()["success"] is True
        for refused in (context(pki), context(pki, "stranger")):
            with pytest.raises(httpx.TransportError):
                with httpx.Client(verify=refused, timeout=5) as client:
                    client.post(f"{daemon.url}/webhook/tradingview", json=ALERT)
        assert daemon.get("/-/healthy").status_code == 200
    finally:
        daemon.stop()


def test_require_client_cert_without_client_ca_is_a_config_error(tmp_path, pki):
    from fksroute import config

    errors = config.load_file(write_routes(tmp_path, """
        version: 1
        server: {tls: {cert: server.pem, key: server.key, require_client_cert: true}}
        plugins: {paper: {type: paper}}
        routes: [{name: all, to: paper}]
    """))
    assert isinstance(errors, list) and "require_client_cert needs client_ca" in str(errors[0])


def test_fksroute_reload_shows_a_client_certificate_when_one_is_required(tmp_path, pki):
    import subprocess
    import sys

    cert, key = pki["server"]
    tls = f"{{cert: {cert.name}, key: {key.name}, client_ca: client-ca.pem, require_client_cert: true}}"
    daemon = serve_tls(tmp_path, tls, context(pki, "client"))
    client_cert, client_key = pki["client"]

    def reload(*extra):
        return subprocess.run([sys.executable, "-m", "fksroute", "reload", "--url", daemon.url,
                               "--cacert", str(pki["server_ca"].pem), *extra],
                              capture_output=True, text=True, timeout=60)

    try:
        done = reload("--cert", str(client_cert), "--key", str(client_key))
        assert done.returncode == 0 and "reloaded" in done.stdout, done.stderr
        refused = reload()
        assert refused.returncode == 1 and "cannot reach" in refused.stderr
    finally:
        daemon.stop()
