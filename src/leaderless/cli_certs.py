"""``leaderless certs ...``: the cluster's PKI from the shell (``security.pki``).

    leaderless certs init --out certs                      # the cluster CA (certs/ca.key 0600)
    leaderless certs issue n1 --ca certs --ip 10.0.0.5     # certs/n1.crt, certs/n1.key
    leaderless certs issue-client ops --ca certs           # for admin commands on node ports
    leaderless certs show certs/n1.crt [--json]            # subject, role, SANs, expiry

Every other command reaches a TLS cluster with ``LEADERLESS_TLS_CA`` (and, for commands on
a node port, ``LEADERLESS_TLS_CERT`` / ``LEADERLESS_TLS_KEY``: ``client_ssl_from_env``).

Exit codes: 0 ok; 2 bad usage or material (a missing CA, an existing file, a bad address).
"""

from __future__ import annotations

import datetime
import json
import ssl
import sys
from pathlib import Path
from typing import NoReturn

import click

from leaderless.runtime.process import EXIT_CONFIG
from leaderless.security import pki
from leaderless.security.tls import ENV_CA, ENV_CERT, ENV_KEY, ClientTls, TlsError

EXPIRY_WARNING_DAYS = 30
"""``certs show`` flags a certificate that expires sooner than this: time to re-issue."""


def _fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def client_ssl_from_env() -> ssl.SSLContext | None:
    """The TLS context CLI commands use, from ``LEADERLESS_TLS_CA`` (and ``_CERT``,
    ``_KEY``); None when the CA is unset. Exits (code 2) naming the bad setting or file."""
    try:
        tls = ClientTls.from_env()
        return None if tls is None else tls.context()
    except TlsError as exc:
        _fail(str(exc))


_days = click.option("--days", type=click.IntRange(1, pki.DAYS_MAX), metavar="N",
                     help=f"Validity in days [default: {pki.CERT_DAYS_DEFAULT}; CA: "
                          f"{pki.CA_DAYS_DEFAULT}].")
_force = click.option("--force", is_flag=True, help="Replace existing files.")
_ca = click.option("--ca", "ca_dir", required=True, metavar="DIR",
                   help="The CA's directory (made by `leaderless certs init`).")
_out = click.option("--out", "out_dir", metavar="DIR",
                    help="Where to write NAME.crt and NAME.key [default: the CA's directory].")


@click.group()
def certs() -> None:
    """Make the cluster's CA and its node and client certificates (TLS)."""


@certs.command("init")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Directory for ca.crt and ca.key (created private, 0700).")
@_days
@_force
def certs_init(out_dir: str, days: int | None, force: bool) -> None:
    """Create the cluster CA: DIR/ca.crt (give it to every node and client) and
    DIR/ca.key (0600: whoever has it can admit anyone to the cluster)."""
    try:
        files = pki.init_ca(Path(out_dir), days=days or pki.CA_DAYS_DEFAULT, force=force)
    except pki.PkiError as exc:
        _fail(str(exc))
    click.echo(f"created the cluster CA: {files.cert} (public) and {files.key} (secret, 0600)")
    click.echo(f"next, for each node: leaderless certs issue NAME --ca {out_dir} --ip ADDRESS")


@certs.command("issue")
@click.argument("node")
@_ca
@click.option("--ip", "ips", multiple=True, metavar="IP",
              help="An address the node is reached at (repeatable).")
@click.option("--dns", "dns_names", multiple=True, metavar="NAME",
              help="A host name the node is reached by (repeatable).")
@click.option("--no-loopback", is_flag=True,
              help="Leave out 127.0.0.1, ::1 and localhost (added by default).")
@_out
@_days
@_force
def certs_issue(node: str, ca_dir: str, ips: tuple[str, ...], dns_names: tuple[str, ...],
                no_loopback: bool, out_dir: str | None, days: int | None, force: bool) -> None:
    """Issue the certificate of node NODE (its --name): CN=NODE, OU=leaderless-node, for
    TLS server and client, naming the addresses peers and clients use to reach it."""
    try:
        files = pki.issue_node(Path(ca_dir), node, ips=ips, dns_names=dns_names,
                               loopback=not no_loopback,
                               out_dir=Path(out_dir) if out_dir else None,
                               days=days or pki.CERT_DAYS_DEFAULT, force=force)
        info = pki.read_certificate(files.cert)
    except pki.PkiError as exc:
        _fail(str(exc))
    names = ", ".join([*info.ips, *info.dns_names])
    click.echo(f"issued node {node}: {files.cert} and {files.key} (0600); names: {names}; "
               f"expires {info.not_after:%Y-%m-%d}")
    ca_cert = Path(ca_dir) / pki.CA_CERT_FILE
    click.echo(f"start it with: leaderless node start --name {node} --tls-ca {ca_cert} "
               f"--tls-cert {files.cert} --tls-key {files.key} ...")


@certs.command("issue-client")
@click.argument("name")
@_ca
@_out
@_days
@_force
def certs_issue_client(name: str, ca_dir: str, out_dir: str | None, days: int | None,
                       force: bool) -> None:
    """Issue a client certificate NAME (OU=leaderless-client, TLS client only): the CLI
    and programs present it to send admin requests on a node port."""
    try:
        files = pki.issue_client(Path(ca_dir), name,
                                 out_dir=Path(out_dir) if out_dir else None,
                                 days=days or pki.CERT_DAYS_DEFAULT, force=force)
        info = pki.read_certificate(files.cert)
    except pki.PkiError as exc:
        _fail(str(exc))
    click.echo(f"issued client {name}: {files.cert} and {files.key} (0600); expires "
               f"{info.not_after:%Y-%m-%d}")
    click.echo(f"use it with: export {ENV_CA}={Path(ca_dir) / pki.CA_CERT_FILE} "
               f"{ENV_CERT}={files.cert} {ENV_KEY}={files.key}")


@certs.command("show")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def certs_show(file: str, as_json: bool) -> None:
    """Show a certificate: subject, role, names (SANs), usages and expiry."""
    try:
        info = pki.read_certificate(Path(file))
    except pki.PkiError as exc:
        _fail(str(exc))
    left = info.not_after - datetime.datetime.now(datetime.UTC)
    days_left = left.days if left.total_seconds() >= 0 else -1
    if as_json:
        click.echo(json.dumps({**info.as_dict(), "days_left": days_left}, indent=2))
        return
    state = ("EXPIRED" if days_left < 0 else
             f"{days_left} days left" + (", re-issue it soon" if
                                         days_left < EXPIRY_WARNING_DAYS else ""))
    names = [f"IP {ip}" for ip in info.ips] + [f"DNS {name}" for name in info.dns_names]
    rows = [("subject", info.subject), ("role", info.role or "not a leaderless certificate"),
            ("issuer", info.issuer),
            ("valid", f"{info.not_before:%Y-%m-%d %H:%M} .. {info.not_after:%Y-%m-%d %H:%M} "
                      f"UTC ({state})"),
            ("names", ", ".join(names) or "-"), ("usages", ", ".join(info.usages) or "-"),
            ("serial", f"{info.serial:x}"), ("sha256", info.fingerprint_sha256)]
    for label, value in rows:
        click.echo(f"{label + ':':<9} {value}")
