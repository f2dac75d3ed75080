"""The cluster PKI (``security.pki``), the checks on TLS material (``security.tls``) and
``leaderless certs``: files, modes, names, usages, expiry and the errors a user meets."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from leaderless.cli import main
from leaderless.security import pki
from leaderless.security.tls import ClientTls, NodeTls, TlsError, client_context


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    pki.init_ca(directory)
    return directory


def test_init_makes_a_private_ca(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    old_umask = os.umask(0)  # even a permissive umask must not expose the key
    try:
        files = pki.init_ca(directory)
    finally:
        os.umask(old_umask)
    assert files == pki.IssuedFiles(directory / "ca.crt", directory / "ca.key")
    assert mode(directory) == 0o700
    assert mode(files.key) == 0o600
    assert mode(files.cert) == 0o644
    cert = load(files.cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.subject == cert.issuer
    assert pki.role_of(cert) == "ca"
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []  # no temps


def test_init_refuses_to_replace_a_ca_unless_forced(ca: Path) -> None:
    before = (ca / "ca.crt").read_bytes()
    with pytest.raises(pki.PkiError, match="a CA exists already; pass --force"):
        pki.init_ca(ca)
    assert (ca / "ca.crt").read_bytes() == before
    pki.init_ca(ca, force=True)
    assert (ca / "ca.crt").read_bytes() != before
    assert mode(ca / "ca.key") == 0o600


def test_each_ca_has_its_own_name(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b")
    assert load(tmp_path / "a" / "ca.crt").subject != load(tmp_path / "b" / "ca.crt").subject


def test_node_certificate_names_usages_and_files(ca: Path) -> None:
    files = pki.issue_node(ca, "n1", ips=["10.0.0.5", "fd00::5"], dns_names=["N1.example.com"])
    assert files == pki.IssuedFiles(ca / "n1.crt", ca / "n1.key")
    assert mode(files.key) == 0o600
    cert = load(files.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n1"
    assert cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "leaderless-node"
    assert cert.issuer == load(ca / "ca.crt").subject
    assert pki.issued_by(cert, load(ca / "ca.crt"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("10.0.0.5", "fd00::5", "127.0.0.1", "::1")]
    assert sans.get_values_for_type(x509.DNSName) == ["n1.example.com", "localhost"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    info = pki.read_certificate(files.cert)
    assert (info.role, info.common_name, info.usages) == ("node", "n1",
                                                          ("serverAuth", "clientAuth"))


def test_loopback_names_can_be_left_out(ca: Path, tmp_path: Path) -> None:
    files = pki.issue_node(ca, "n2", ips=["10.0.0.6"], loopback=False, out_dir=tmp_path / "n2")
    assert files.cert == tmp_path / "n2" / "n2.crt"
    info = pki.read_certificate(files.cert)
    assert (info.ips, info.dns_names) == (("10.0.0.6",), ())
    with pytest.raises(pki.PkiError, match="at least one address"):
        pki.issue_node(ca, "n3", loopback=False)


def test_client_certificate_is_for_clients_only(ca: Path) -> None:
    files = pki.issue_client(ca, "ops")
    assert mode(files.key) == 0o600
    info = pki.read_certificate(files.cert)
    assert (info.role, info.common_name, info.usages) == ("client", "ops", ("clientAuth",))
    assert (info.ips, info.dns_names) == ((), ())


def test_expiry_follows_days_and_stays_within_the_ca(ca: Path) -> None:
    files = pki.issue_node(ca, "n1", days=30)
    expiry = pki.certificate_expiry(files.cert)
    expected = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    assert abs((expiry - expected).total_seconds()) < 120
    assert pki.read_certificate(files.cert).not_after == expiry
    with pytest.raises(pki.PkiError, match="would outlive the CA"):
        pki.issue_node(ca, "n2", days=pki.CA_DAYS_DEFAULT + 1)
    with pytest.raises(pki.PkiError, match="--days 0: must be 1"):
        pki.issue_client(ca, "ops", days=0)


def test_issue_errors_name_what_is_wrong(ca: Path, tmp_path: Path) -> None:
    pki.issue_node(ca, "n1")
    with pytest.raises(pki.PkiError, match="n1.crt exists already; pass --force"):
        pki.issue_node(ca, "n1")
    pki.issue_node(ca, "n1", force=True)
    with pytest.raises(pki.PkiError, match=r"--ip '10\.0\.0\.300': is not an IP address"):
        pki.issue_node(ca, "n2", ips=["10.0.0.300"])
    with pytest.raises(pki.PkiError, match="--dns 'bad name': is not a DNS name"):
        pki.issue_node(ca, "n2", dns_names=["bad name"])
    with pytest.raises(pki.PkiError, match="NODE '../x': must start with a letter"):
        pki.issue_node(ca, "../x")
    with pytest.raises(pki.PkiError, match="no such directory; create a CA with"):
        pki.issue_node(tmp_path / "nowhere", "n2")
    with pytest.raises(pki.PkiError, match="is a file; --ca takes the directory"):
        pki.issue_client(ca / "ca.crt", "ops")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pki.PkiError, match=r"holds no CA \(ca.crt, ca.key missing\)"):
        pki.issue_client(empty, "ops")
    assert not (ca / "n2.key").exists()  # nothing half-made


def test_a_ca_whose_key_is_not_its_own_is_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(pki.PkiError, match="is not the key of"):
        pki.issue_node(tmp_path / "a", "n1")


def test_write_file_never_replaces_without_being_asked(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    pki.write_file(target, b"one", 0o600)
    with pytest.raises(pki.PkiError, match="exists already"):
        pki.write_file(target, b"two", 0o600)
    assert target.read_bytes() == b"one"
    pki.write_file(target, b"two", 0o600, replace=True)
    assert target.read_bytes() == b"two" and mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


# -- checking material for TLS ------------------------------------------------------------


def test_node_tls_loads_good_material(ca: Path) -> None:
    pki.issue_node(ca, "n1")
    tls = NodeTls.load(ca / "ca.crt", ca / "n1.crt", ca / "n1.key")
    assert tls.name == "n1"
    assert tls.node_server.verify_mode == ssl.CERT_REQUIRED
    assert tls.client_server.verify_mode == ssl.CERT_OPTIONAL
    assert tls.node_client.check_hostname
    assert tls.node_server.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_material_errors_name_the_file(ca: Path, tmp_path: Path) -> None:
    pki.issue_node(ca, "n1")
    pki.issue_node(ca, "n2")
    pki.issue_client(ca, "ops")
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue_node(other, "n1")
    crt, key = ca / "n1.crt", ca / "n1.key"
    cases = [
        ((tmp_path / "missing.crt", crt, key), r"tls.ca .*missing.crt: no such file"),
        ((crt, crt, key), r"tls.ca .*n1.crt: is not a CA certificate"),
        ((ca / "ca.crt", tmp_path / "no.crt", key), r"tls.cert .*no.crt: no such file"),
        ((ca / "ca.crt", crt, tmp_path / "no.key"), r"tls.key .*no.key: no such file"),
        ((ca / "ca.crt", crt, ca / "n2.key"), r"tls.key .*n2.key: is not the key of tls.cert"),
        ((ca / "ca.crt", key, key), r"tls.cert .*n1.key: is not a PEM certificate"),
        ((ca / "ca.crt", other / "n1.crt", other / "n1.key"),
         r"tls.cert .*other/n1.crt: was not issued by the CA in tls.ca"),
        ((ca / "ca.crt", ca / "ops.crt", ca / "ops.key"), r"is not a node certificate"),
    ]
    for (ca_file, cert_file, key_file), pattern in cases:
        with pytest.raises(TlsError, match=pattern):
            NodeTls.load(ca_file, cert_file, key_file)


def test_an_expired_certificate_is_refused_at_load(ca: Path) -> None:
    authority = pki.load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, pki.NODE_OU),
                         x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(authority.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .sign(authority.key, hashes.SHA256()))
    (ca / "old.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (ca / "old.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(TlsError, match=r"tls.cert .*old.crt: expired on"):
        NodeTls.load(ca / "ca.crt", ca / "old.crt", ca / "old.key")


def test_client_tls_from_the_environment(ca: Path) -> None:
    pki.issue_client(ca, "ops")
    assert ClientTls.from_env({}) is None
    with pytest.raises(TlsError, match="LEADERLESS_TLS_CA is not"):
        ClientTls.from_env({"LEADERLESS_TLS_CERT": str(ca / "ops.crt")})
    tls = ClientTls.from_env({"LEADERLESS_TLS_CA": str(ca / "ca.crt"),
                              "LEADERLESS_TLS_CERT": str(ca / "ops.crt"),
                              "LEADERLESS_TLS_KEY": str(ca / "ops.key")})
    assert tls == ClientTls(str(ca / "ca.crt"), str(ca / "ops.crt"), str(ca / "ops.key"))
    assert tls.context().check_hostname
    with pytest.raises(TlsError, match="give both"):
        client_context(ca / "ca.crt", ca / "ops.crt")
    with pytest.raises(TlsError, match=r"LEADERLESS_TLS_CA .*ops.crt: is not a CA"):
        client_context(ca / "ops.crt")


# -- the command --------------------------------------------------------------------------


def test_certs_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = tmp_path / "certs"
    result = runner.invoke(main, ["certs", "init", "--out", str(directory)])
    assert result.exit_code == 0, result.output
    assert mode(directory / "ca.key") == 0o600
    again = runner.invoke(main, ["certs", "init", "--out", str(directory)])
    assert again.exit_code == 2 and "pass --force" in again.output
    result = runner.invoke(main, ["certs", "issue", "n1", "--ca", str(directory),
                                  "--ip", "10.1.2.3", "--dns", "n1.lan", "--days", "90"])
    assert result.exit_code == 0, result.output
    assert "--tls-cert" in result.output
    bad = runner.invoke(main, ["certs", "issue", "n2", "--ca", str(directory), "--ip", "x"])
    assert bad.exit_code == 2 and "--ip 'x': is not an IP address" in bad.output
    missing = runner.invoke(main, ["certs", "issue", "n2", "--ca", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "no such directory" in missing.output
    result = runner.invoke(main, ["certs", "issue-client", "ops", "--ca", str(directory)])
    assert result.exit_code == 0 and "LEADERLESS_TLS_CERT=" in result.output
    shown = runner.invoke(main, ["certs", "show", str(directory / "n1.crt")])
    assert shown.exit_code == 0
    assert "role:     node" in shown.output
    assert "IP 10.1.2.3" in shown.output and "DNS n1.lan" in shown.output
    assert "89 days left" in shown.output or "90 days left" in shown.output
    as_json = runner.invoke(main, ["certs", "show", str(directory / "ops.crt"), "--json"])
    assert '"role": "client"' in as_json.output and '"usages": [\n    "clientAuth"' in (
        as_json.output)
    not_cert = runner.invoke(main, ["certs", "show", str(directory / "ops.key")])
    assert not_cert.exit_code == 2 and "is not a PEM certificate" in not_cert.output
