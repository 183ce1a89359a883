"""Consortium CA, SuperLink certificate and SuperNode keys (appliance.federated.certs)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from appliance.errors import ConfigError
from appliance.federated.certs import (
    describe_certificate,
    make_ca,
    make_consortium,
    make_server_cert,
    make_site_keys,
)

EXTRA_HOSTS = ["coordinator.example.org", "10.20.30.40", "2001:db8::7"]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("consortium")
    return make_consortium(out, EXTRA_HOSTS, ["siteA", "site-b_2"])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files and X.509 contents ----------------------------------------------------------------


def test_layout_and_private_key_modes(consortium):
    root = consortium.ca.cert.parent
    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "sites/siteA.key",
                 "sites/siteA.pub", "sites/site-b_2.key", "sites/site-b_2.pub"):
        assert (root / name).is_file(), name
    for key in (consortium.ca.key, consortium.server.key,
                *(s.private_key for s in consortium.sites.values())):
        assert _mode(key) == 0o600, key
    assert not (root / "public_keys.csv").exists()  # flwr 1.41 registers keys via the CLI


def test_ca_is_a_ca(consortium):
    ca = _cert(consortium.ca.cert)
    assert ca.subject == ca.issuer
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ca.verify_directly_issued_by(ca)  # self-signed signature holds


def test_server_cert_signed_by_ca_with_sans_and_server_auth(consortium):
    ca, server = _cert(consortium.ca.cert), _cert(consortium.server.cert)
    server.verify_directly_issued_by(ca)  # raises InvalidSignature if not signed by this CA
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = san.get_values_for_type(x509.IPAddress)
    dns = san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("10.20.30.40") in ips
    assert ipaddress.ip_address("2001:db8::7") in ips
    assert "localhost" in dns and "coordinator.example.org" in dns
    assert "10.20.30.40" not in dns  # IPs are IPAddress entries, not DNS names
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert server.not_valid_after_utc <= ca.not_valid_after_utc
    # the key file belongs to the certificate
    key = serialization.load_pem_private_key(consortium.server.key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_describe_certificate(consortium):
    d = describe_certificate(consortium.server.cert)
    assert d["subject"] == "CN=coordinator.example.org"
    assert d["issuer"] == "CN=RFM consortium CA"
    assert {"127.0.0.1", "localhost", "coordinator.example.org", "10.20.30.40"} <= set(d["sans"])
    assert d["not_after"] > d["not_before"] and d["is_ca"] is False
    assert json.dumps(d)  # fit for a status command's --json
    assert describe_certificate(consortium.ca.cert)["is_ca"] is True
    with pytest.raises(ConfigError, match="not found"):
        describe_certificate(consortium.ca.cert.parent / "missing.crt")


def test_refuses_to_overwrite(tmp_path):
    make_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match=r"ca\.(crt|key) already exists; refusing to overwrite"):
        make_ca(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before
    make_server_cert(tmp_path, tmp_path, [])
    with pytest.raises(ConfigError, match=r"server\.(crt|key) already exists"):
        make_server_cert(tmp_path, tmp_path, [])
    make_site_keys(tmp_path, "siteA")
    with pytest.raises(ConfigError, match=r"siteA\.(key|pub) already exists"):
        make_site_keys(tmp_path, "siteA")
    # a consortium over an existing one is refused before anything is written
    with pytest.raises(ConfigError, match="already exists"):
        make_consortium(tmp_path, [], ["newsite"])
    assert not (tmp_path / "sites").exists()
    err = None
    try:
        make_ca(tmp_path)
    except ConfigError as e:
        err = str(e)
    assert err is not None and "\n" not in err


@pytest.mark.parametrize("bad", ["", "-site", "_x", "site a", "site/../x", "a" * 65, "sité", "a.b"])
def test_bad_site_name_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="bad site name"):
        make_site_keys(tmp_path, bad)
    with pytest.raises(ConfigError, match="bad site name"):
        make_consortium(tmp_path / "c", [], ["ok", bad])
    assert list(tmp_path.iterdir()) == []


def test_duplicate_site_and_bad_host_refused(tmp_path):
    with pytest.raises(ConfigError, match="listed twice"):
        make_consortium(tmp_path, [], ["siteA", "SITEA"])
    for bad in ["https://coord.example.org", "coord.example.org:9092", "bad host", "-x.org"]:
        with pytest.raises(ConfigError, match="bad host"):
            make_consortium(tmp_path, [bad], ["siteA"])
    assert list(tmp_path.iterdir()) == []
    make_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match="not found"):
        make_server_cert(tmp_path / "nowhere", tmp_path / "srv", [])


# --- site keys: what flower itself loads -----------------------------------------------------


def test_site_keys_load_with_flower(consortium):
    site = consortium.sites["siteA"]
    pub_line = site.public_key.read_text()
    assert pub_line.startswith("ecdsa-sha2-nistp384 ")
    assert len(pub_line.strip().splitlines()) == 1
    pub = serialization.load_ssh_public_key(pub_line.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp384r1"
    assert site.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")

    # flower-supernode's own loader for --auth-supernode-private-key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    loaded = _try_setup_client_authentication(argparse.Namespace(
        auth_supernode_private_key=str(site.private_key), auth_supernode_public_key=None))
    assert loaded is not None
    priv, derived_pub = loaded
    assert isinstance(priv, ec.EllipticCurvePrivateKey)
    assert derived_pub.public_numbers() == pub.public_numbers()

    # `flwr supernode register`'s own loader for the public key file
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(site.public_key) == pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- a real TLS handshake on loopback --------------------------------------------------------


class _TlsServer:
    """Accepts TLS connections on 127.0.0.1 and answers b'ok' to each."""

    def __init__(self, cert: Path, key: Path):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused us: that is what the negative test wants

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _client(port: int, cafile: Path, server_hostname: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(cafile))  # trusts only this CA
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(2)


def test_tls_handshake_on_loopback(consortium, tmp_path):
    other_ca = make_ca(tmp_path / "other", name="Some other CA")
    with _TlsServer(consortium.server.cert, consortium.server.key) as srv:
        assert _client(srv.port, consortium.ca.cert, "localhost") == b"ok"
        assert _client(srv.port, consortium.ca.cert, "127.0.0.1") == b"ok"
        assert _client(srv.port, consortium.ca.cert, "coordinator.example.org") == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            _client(srv.port, other_ca.cert, "localhost")
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
            _client(srv.port, consortium.ca.cert, "not-in-the-cert.example.org")


# --- the real flower-superlink / flwr / flower-supernode -------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flower_env(flwr_home: Path) -> dict[str, str]:
    bindir = Path(sys.executable).parent  # the venv's bin, not the resolved base interpreter
    assert (bindir / "flower-superlink").exists(), f"flower-superlink not found in {bindir}"
    env = dict(os.environ)
    env.update(
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(flwr_home),
    )
    return env


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    # Own session, so the SuperExec children it spawns can be stopped with it.
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _flwr_json(args: list[str], env: dict) -> dict:
    res = subprocess.run(["flwr", *args, "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=60)
    out = res.stdout
    assert res.returncode == 0, f"flwr {' '.join(args)} failed: {out}\n{res.stderr}"
    return json.loads(out[out.index("{"):])


def test_real_superlink_tls_and_supernode_auth(tmp_path):
    files = make_consortium(tmp_path / "consortium", ["coordinator.example.org"],
                            ["siteA", "siteB"])
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    env = _flower_env(flwr_home)
    port, port_a, port_b = _free_port(), _free_port(), _free_port()
    ca = str(files.ca.cert)
    # The Control API connection that `flwr supernode register` uses (TLS with our CA).
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "consortium"\n\n[superlink.consortium]\n'
        f'address = "localhost:{port}"\nroot-certificates = "{ca}"\n', encoding="utf-8")

    procs: list[subprocess.Popen] = []
    try:
        link = _start(["flower-superlink", "--ssl-ca-certfile", ca,
                       "--ssl-certfile", str(files.server.cert),
                       "--ssl-keyfile", str(files.server.key),
                       "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port)],
                      env, tmp_path / "superlink.log")
        procs.append(link)

        # Listening, over TLS, with our server certificate.
        served = None
        deadline = time.monotonic() + 60
        while served is None and time.monotonic() < deadline:
            assert link.poll() is None, (tmp_path / "superlink.log").read_text()
            try:
                ctx = ssl.create_default_context(cafile=ca)
                with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                        served = tls.getpeercert(binary_form=True)
            except (ConnectionRefusedError, TimeoutError, ssl.SSLEOFError):
                time.sleep(0.3)
        assert served is not None, (tmp_path / "superlink.log").read_text()
        assert served == _cert(files.server.cert).public_bytes(serialization.Encoding.DER)

        # The coordinator registers siteA's public key; siteB stays unregistered.
        reg = _flwr_json(["supernode", "register", str(files.sites["siteA"].public_key),
                          "consortium", "--name", "siteA"], env)
        node_id = str(reg["node-id"])

        sn_a = _start(["flower-supernode", "--superlink", f"localhost:{port}",
                       "--root-certificates", ca,
                       "--auth-supernode-private-key", str(files.sites["siteA"].private_key),
                       "--port", str(port_a)], env, tmp_path / "siteA.log")
        procs.append(sn_a)
        sn_b = _start(["flower-supernode", "--superlink", f"127.0.0.1:{port}",
                       "--root-certificates", ca,
                       "--auth-supernode-private-key", str(files.sites["siteB"].private_key),
                       "--port", str(port_b), "--max-retries", "1", "--max-wait-time", "20"],
                      env, tmp_path / "siteB.log")
        procs.append(sn_b)

        status = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert sn_a.poll() is None, (tmp_path / "siteA.log").read_text()
            nodes = _flwr_json(["supernode", "list", "consortium"], env)["nodes"]
            status = {str(n["node-id"]): n["status"] for n in nodes}.get(node_id)
            if status == "online":
                break
            time.sleep(0.5)
        assert status == "online", (tmp_path / "siteA.log").read_text()

        # The unregistered site is turned away.
        rc = sn_b.wait(60)
        log_b = (tmp_path / "siteB.log").read_text()
        assert rc != 0 and "SuperNode ID" not in log_b, log_b
        nodes = _flwr_json(["supernode", "list", "consortium"], env)["nodes"]
        assert [str(n["node-id"]) for n in nodes] == [node_id]
    finally:
        for p in reversed(procs):
            _stop(p)
