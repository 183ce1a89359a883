"""TLS certificates and SuperNode keys for a Flower (flwr 1.41) consortium.

What each file is for, with flwr 1.41.0:

* ``ca.crt`` / ``ca.key``: the consortium CA. ``ca.key`` stays with the coordinator (offline
  if possible); ``ca.crt`` goes to every site.
* ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, with SANs
  for every address a SuperNode or the ``flwr`` CLI dials (127.0.0.1 and localhost always).
  In 1.41 the Fleet, Control and Runtime APIs share one HTTPS port (``--host``/``--port``,
  default 127.0.0.1:8000)::

      flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt \\
          --ssl-keyfile server.key --enable-supernode-auth --host 0.0.0.0 --port 9092

  TLS is one-way: SuperNodes verify the SuperLink, they present no client certificate.
* ``sites/<site>.key`` / ``sites/<site>.pub``: one EC P-384 key pair per site, the same thing
  ``ssh-keygen -t ecdsa -b 384`` writes. flower-supernode loads the private key with
  ``cryptography``'s ``load_ssh_private_key``, so it must be in OpenSSH format
  (``-----BEGIN OPENSSH PRIVATE KEY-----``, unencrypted); a PEM/PKCS#8 key is refused::

      flower-supernode --superlink HOST:9092 --root-certificates ca.crt \\
          --auth-supernode-private-key sites/<site>.key

  The private key belongs at its site only; a site may make its own with `make_site_keys` and
  send just the ``.pub`` file.

Registering a site's public key: 1.41 has no key list file. ``--auth-list-public-keys`` (a CSV
in older releases) now makes flower-superlink exit with "no longer supported". With
``--enable-supernode-auth`` the coordinator registers each key over the Control API::

    flwr supernode register sites/<site>.pub CONNECTION --name <site>

where CONNECTION names a ``[superlink.CONNECTION]`` table (``address = "HOST:9092"``,
``root-certificates = "/path/ca.crt"``) in ``$FLWR_HOME/config.toml`` (default ~/.flwr).
So `make_consortium` writes no public_keys.csv.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import ConfigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
SITES_DIR = "sites"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")

_SITE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CURVE = ec.SECP384R1
# Back-date validity a little: a site clock a few minutes slow must not see "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CaFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertFiles:
    cert: Path
    key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class SiteKeyFiles:
    site: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class ConsortiumFiles:
    ca: CaFiles
    server: ServerCertFiles
    sites: dict[str, SiteKeyFiles]


def make_ca(out_dir: Path, name: str = "RFM consortium CA", days: int = 3650) -> CaFiles:
    """Write a self-signed CA (ca.crt, ca.key with mode 0600) into `out_dir`."""
    out_dir = Path(out_dir)
    files = CaFiles(cert=out_dir / CA_CERT, key=out_dir / CA_KEY)
    _refuse_existing([files.cert, files.key])
    _check_days(days)
    key = ec.generate_private_key(_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(files.key, _pem_private(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_server_cert(
    ca_dir: Path, out_dir: Path, hosts: list[str], days: int = 825
) -> ServerCertFiles:
    """Write server.crt/server.key (0600) signed by the CA in `ca_dir`, valid for `hosts`."""
    ca_dir, out_dir = Path(ca_dir), Path(out_dir)
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    _refuse_existing([cert_path, key_path])
    _check_days(days)
    all_hosts = _normalise_hosts(hosts)
    ca_cert, ca_key = _load_ca(ca_dir)

    key = ec.generate_private_key(_CURVE())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    sans = [
        x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h)
        for h in all_hosts
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, _pem_private(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return ServerCertFiles(cert=cert_path, key=key_path, hosts=tuple(all_hosts))


def make_site_keys(out_dir: Path, site: str) -> SiteKeyFiles:
    """Write `<site>.key` (OpenSSH private key, 0600) and `<site>.pub` (OpenSSH line), EC P-384."""
    _check_site(site)
    out_dir = Path(out_dir)
    files = SiteKeyFiles(site=site, private_key=out_dir / f"{site}.key",
                         public_key=out_dir / f"{site}.pub")
    _refuse_existing([files.private_key, files.public_key])
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # flower-supernode passes no password
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(files.private_key, private)
    _write_public(files.public_key, public + f" {site}\n".encode())
    return files


def make_consortium(out_dir: Path, hosts: list[str], sites: list[str]) -> ConsortiumFiles:
    """Write a CA, a SuperLink certificate and one key pair per site under `out_dir`."""
    out_dir = Path(out_dir)
    for site in sites:
        _check_site(site)
    seen: set[str] = set()
    for site in sites:
        # Case-insensitive: on a case-insensitive file system A.key and a.key are one file.
        if site.lower() in seen:
            raise ConfigError(f"site {site!r} is listed twice")
        seen.add(site.lower())
    _normalise_hosts(hosts)
    sites_dir = out_dir / SITES_DIR
    # Check everything first so a refusal leaves no half-made consortium behind.
    _refuse_existing(
        [out_dir / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
        + [sites_dir / f"{s}.{ext}" for s in sites for ext in ("key", "pub")]
    )
    ca = make_ca(out_dir)
    server = make_server_cert(out_dir, out_dir, hosts)
    site_files = {s: make_site_keys(sites_dir, s) for s in sites}
    return ConsortiumFiles(ca=ca, server=server, sites=site_files)


def describe_certificate(path: Path) -> dict:
    """Subject, issuer, SANs, validity and SHA-256 fingerprint of a PEM certificate."""
    path = Path(path)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"certificate {path.name} not found in {path.parent}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path.name} is not a readable PEM certificate ({type(e).__name__})") from None
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(v) for v in san_ext.get_values_for_type(x509.DNSName)]
        sans += [str(v) for v in san_ext.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": sans,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "is_ca": is_ca,
        "sha256": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    }


# --- helpers ---------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise ConfigError(f"certificate validity must be a positive number of days, got {days!r}")


def _check_site(site: str) -> None:
    if not isinstance(site, str) or not _SITE_RE.fullmatch(site):
        raise ConfigError(
            f"bad site name {site!r}: use 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit"
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _normalise_hosts(hosts: list[str]) -> list[str]:
    """Configured hosts first (the first becomes the CN), then the loopback defaults; deduped."""
    if isinstance(hosts, str):
        raise ConfigError("hosts must be a list of host names or IP addresses, not one string")
    out: list[str] = []
    for raw in list(hosts) + list(DEFAULT_HOSTS):
        host = str(raw).strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            continue
        if _is_ip(host):
            host = str(ipaddress.ip_address(host))
        else:
            host = host.lower().rstrip(".")
            labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
            if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(lb) for lb in labels):
                raise ConfigError(
                    f"bad host {raw!r} for the server certificate: give a DNS name or an IP "
                    "address, without scheme or port"
                )
        if host not in out:
            out.append(host)
    return out


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for p in (cert_path, key_path):
        if not p.is_file():
            raise ConfigError(f"CA file {p.name} not found in {ca_dir}; run make_ca first")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"cannot read the CA in {ca_dir} ({type(e).__name__})") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ConfigError(f"{CA_KEY} does not belong to {CA_CERT} in {ca_dir}")
    return cert, key


def _refuse_existing(paths: list[Path]) -> None:
    for p in paths:
        if p.exists() or p.is_symlink():
            raise ConfigError(f"{p} already exists; refusing to overwrite it")


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite, even if the file appeared after the up-front check.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite it") from None
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away from a public file
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd != -1:
            os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    _write_exclusive(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_exclusive(path, data, 0o644)
