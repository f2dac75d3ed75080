"""The cluster's PKI: one CA per cluster, and the node and client certificates it signs.

A cluster's trust is its CA: a node or a client is admitted when its certificate chains to
the CA, and its role is the certificate's organizational unit (``leaderless-node`` or
``leaderless-client``): on the node port only nodes may send peer frames, and a node's
announced name must be its certificate's common name (``security.tls``).

Keys are EC P-256 (ECDSA): Python's ``ssl`` (OpenSSL) accepts them on both sides of TLS 1.2
and 1.3, and they are small and fast to verify. Private keys are written with mode 0600
through a temporary file created 0600 and then linked into place, so a key is never
readable by others, not even for a moment, and an existing file is never replaced unless
``force`` says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from leaderless.config import NAME_PATTERN
from leaderless.core.messages import NAME_BYTES_MAX
from leaderless.durable_files import write_atomically

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
NODE_OU = "leaderless-node"
"""Subject OU of a node certificate: may send peer frames on the node port."""
CLIENT_OU = "leaderless-client"
"""Subject OU of a client certificate: may send only admin requests on the node port."""
ORGANIZATION = "leaderless"
CA_DAYS_DEFAULT = 3650
"""A CA outlives the certificates it signs: ten years, so replacing it is rare and planned."""
CERT_DAYS_DEFAULT = 365
"""Node and client certificates: a year, renewed by re-issuing (``certs show`` tells when)."""
DAYS_MAX = 36525
"""A hundred years: a longer validity is a typo, not a plan."""
CLOCK_SKEW_S = 300
"""Certificates are valid from five minutes before they are made, so a machine whose clock
is a little behind the issuing one accepts them at once."""
DEFAULT_SANS = ("127.0.0.1", "::1", "localhost")
"""Added to every node certificate unless ``loopback=False``: the CLI and local tools
reach a node on loopback."""
KEY_MODE = 0o600
CERT_MODE = 0o644
CA_DIR_MODE = 0o700
"""The CA directory holds the key that can admit anyone to the cluster."""
DNS_NAME_PATTERN = re.compile(
    r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
DNS_NAME_BYTES_MAX = 253


class PkiError(Exception):
    """Certificate material cannot be made or read; the message names the file or option
    and says what to do."""


@dataclasses.dataclass(frozen=True)
class IssuedFiles:
    """Where a new certificate and its private key were written."""

    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class CertificateInfo:
    """What ``leaderless certs show`` prints about a certificate."""

    path: Path
    subject: str
    issuer: str
    common_name: str
    role: str
    """``ca``, ``node``, ``client``, or ``""`` for a certificate leaderless did not make."""
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    ips: tuple[str, ...]
    dns_names: tuple[str, ...]
    usages: tuple[str, ...]
    """Extended key usages: ``serverAuth`` and/or ``clientAuth``."""
    fingerprint_sha256: str

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data["not_before"] = self.not_before.isoformat()
        data["not_after"] = self.not_after.isoformat()
        data["ips"], data["dns_names"], data["usages"] = (
            list(self.ips), list(self.dns_names), list(self.usages))
        return data


@dataclasses.dataclass(frozen=True)
class ClusterCa:
    """A loaded CA: its certificate and the key that signs."""

    directory: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


# -- making -------------------------------------------------------------------------------


def init_ca(out_dir: Path, *, days: int = CA_DAYS_DEFAULT, force: bool = False) -> IssuedFiles:
    """Create a cluster CA in ``out_dir`` (made 0700 if missing): ``ca.crt`` and ``ca.key``
    (0600). Refuses to replace an existing CA unless ``force``: every certificate the old
    one signed would stop being trusted."""
    _check_days(days)
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / CA_CERT_FILE, out_dir / CA_KEY_FILE
    _make_private_dir(out_dir)
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise PkiError(f"{path}: a CA exists already; pass --force to replace it "
                               "(every certificate it issued will stop being trusted)")
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix makes each cluster's CA name unique, so a certificate from another
    # cluster's CA fails as "unable to get local issuer certificate", not as a confusing
    # signature failure between two CAs of the same name.
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, f"leaderless cluster CA {secrets.token_hex(4)}"),
    ])
    now = _now()
    public = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_S))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    return _write_pair(cert, key, cert_path, key_path, force)


def issue_node(ca_dir: Path, name: str, *, ips: Iterable[str] = (),
               dns_names: Iterable[str] = (), loopback: bool = True,
               out_dir: Path | None = None, days: int = CERT_DAYS_DEFAULT,
               force: bool = False) -> IssuedFiles:
    """A node certificate ``NAME.crt`` / ``NAME.key`` in ``out_dir`` (default: the CA's
    directory): subject CN=NAME, OU=leaderless-node; SANs: ``ips`` and ``dns_names``, plus
    127.0.0.1, ::1 and localhost when ``loopback``; for both TLS server and client."""
    _check_name(name, "NODE")
    addresses = [_parse_ip(text) for text in ips]
    names = [_check_dns(text) for text in dns_names]
    if loopback:
        addresses += [ipaddress.ip_address(ip) for ip in DEFAULT_SANS[:2]]
        names.append(DEFAULT_SANS[2])
    sans: list[x509.GeneralName] = [x509.IPAddress(a) for a in dict.fromkeys(addresses)]
    sans += [x509.DNSName(n) for n in dict.fromkeys(names)]
    if not sans:
        raise PkiError("a node certificate needs at least one address: give --ip or --dns, "
                       "or keep the loopback defaults")
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return _issue(ca_dir, name, NODE_OU, usages, sans, out_dir, days, force)


def issue_client(ca_dir: Path, name: str, *, out_dir: Path | None = None,
                 days: int = CERT_DAYS_DEFAULT, force: bool = False) -> IssuedFiles:
    """A client certificate ``NAME.crt`` / ``NAME.key`` (CN=NAME, OU=leaderless-client, TLS
    client only): lets a program or the CLI send admin requests to a node port."""
    _check_name(name, "NAME")
    return _issue(ca_dir, name, CLIENT_OU, [ExtendedKeyUsageOID.CLIENT_AUTH], [], out_dir,
                  days, force)


def _issue(ca_dir: Path, name: str, unit: str, usages: list[x509.ObjectIdentifier],
           sans: list[x509.GeneralName], out_dir: Path | None, days: int,
           force: bool) -> IssuedFiles:
    _check_days(days)
    ca = load_ca(ca_dir)
    out = Path(out_dir) if out_dir is not None else ca.directory
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise PkiError(f"{path} exists already; pass --force to replace it, or "
                               "--out another directory")
    now = _now()
    not_after = now + datetime.timedelta(days=days)
    if not_after > ca.cert.not_valid_after_utc:
        raise PkiError(f"--days {days}: the certificate would outlive the CA, which expires "
                       f"{ca.cert.not_valid_after_utc:%Y-%m-%d}; give fewer days")
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca.cert.subject).public_key(public)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_S))
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    return _write_pair(cert, key, cert_path, key_path, force)


# -- reading ------------------------------------------------------------------------------


def load_ca(ca_dir: Path) -> ClusterCa:
    """The CA made by ``init_ca`` in ``ca_dir``; PkiError says what is missing or wrong."""
    ca_dir = Path(ca_dir)
    if ca_dir.is_file():
        raise PkiError(f"--ca {ca_dir}: is a file; --ca takes the directory made by "
                       "`leaderless certs init --out DIR`")
    if not ca_dir.is_dir():
        raise PkiError(f"--ca {ca_dir}: no such directory; create a CA with "
                       f"`leaderless certs init --out {ca_dir}`")
    cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    missing = [p.name for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise PkiError(f"--ca {ca_dir}: holds no CA ({', '.join(missing)} missing); give the "
                       "directory made by `leaderless certs init`")
    cert = load_certificate(cert_path)
    if not _is_ca(cert):
        raise PkiError(f"{cert_path}: is not a CA certificate; give the directory made by "
                       "`leaderless certs init`")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{key_path}: not a PEM private key without a password ({exc})") from None
    except OSError as exc:
        raise PkiError(f"{key_path}: cannot read: {exc.strerror or exc}") from None
    if (not isinstance(key, ec.EllipticCurvePrivateKey)
            or _public_der(key) != _cert_public_der(cert)):
        raise PkiError(f"{key_path}: is not the key of {cert_path}; the CA directory is "
                       "inconsistent (make a new CA with `leaderless certs init --force`)")
    return ClusterCa(ca_dir, cert, key)


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate; PkiError names the file when it is missing or not a certificate."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: no such file") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{path}: is not a PEM certificate") from None


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True if ``ca`` signed ``cert`` (names match and the signature verifies)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def role_of(cert: x509.Certificate) -> str:
    """``node`` / ``client`` from the subject OU, ``ca`` for a CA, else ``""``."""
    if _is_ca(cert):
        return "ca"
    units = {a.value for a in cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)}
    if NODE_OU in units:
        return "node"
    if CLIENT_OU in units:
        return "client"
    return ""


def read_certificate(path: Path) -> CertificateInfo:
    """What a certificate file says: subject, role, SANs, usages and validity."""
    cert = load_certificate(path)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))
        dns = tuple(sans.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        ips, dns = (), ()
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = tuple(_USAGE_NAMES.get(oid, oid.dotted_string) for oid in eku)
    except x509.ExtensionNotFound:
        usages = ()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertificateInfo(
        path=Path(path), subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(), common_name=str(cns[0].value) if cns else "",
        role=role_of(cert), serial=cert.serial_number,
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        ips=ips, dns_names=dns, usages=usages,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":"))


def certificate_expiry(path: Path) -> datetime.datetime:
    """When the certificate in ``path`` expires (UTC); PkiError if it cannot be read."""
    return load_certificate(path).not_valid_after_utc


_USAGE_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
                ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


# -- helpers ------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _public_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert_public_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_days(days: int) -> None:
    if not 1 <= days <= DAYS_MAX:
        raise PkiError(f"--days {days}: must be 1..{DAYS_MAX}")


def _check_name(name: str, what: str) -> None:
    if not NAME_PATTERN.match(name):
        raise PkiError(f"{what} {name!r}: must start with a letter or digit and use only "
                       "A-Z a-z 0-9 . _ - (it becomes the certificate's CN and file name)")
    if len(name.encode()) > NAME_BYTES_MAX:
        raise PkiError(f"{what} {name!r}: is longer than {NAME_BYTES_MAX} bytes")


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise PkiError(f"--ip {text!r}: is not an IP address (e.g. 10.0.0.5 or fd00::5); "
                       "give host names with --dns") from None


def _check_dns(text: str) -> str:
    if len(text) > DNS_NAME_BYTES_MAX or not DNS_NAME_PATTERN.match(text):
        raise PkiError(f"--dns {text!r}: is not a DNS name (e.g. node1.example.com); give "
                       "addresses with --ip")
    return text.lower()


def _make_private_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise PkiError(f"--out {path}: is a file; give a directory")
    try:
        path.mkdir(mode=CA_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, CA_DIR_MODE)
    except OSError as exc:
        raise PkiError(f"--out {path}: cannot create a private directory: "
                       f"{exc.strerror or exc}") from None


def _write_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path,
                key_path: Path, force: bool) -> IssuedFiles:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_file(key_path, key_pem, KEY_MODE, replace=force)
    try:
        write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE,
                   replace=force)
    except PkiError:
        if not force:
            key_path.unlink(missing_ok=True)  # not half a pair left behind
        raise
    return IssuedFiles(cert_path, key_path)


def write_file(path: Path, data: bytes, mode: int, *, replace: bool = False) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, atomically (``durable_files``):
    never readable by others, not even briefly. Without ``replace`` an existing ``path``
    is an error."""
    try:
        write_atomically(Path(path), data, mode, replace=replace)
    except FileExistsError:
        raise PkiError(f"{path} exists already; pass --force to replace it") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot write: {exc.strerror or exc}") from None
