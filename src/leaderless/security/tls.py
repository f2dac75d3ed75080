"""TLS on every TCP connection: ``ssl.SSLContext``s from the cluster's PKI files, and who
is at the other end of a connection.

Four contexts, one per side of each kind of connection:

- ``NodeTls.node_server`` (the node port): mutual TLS; the peer must present a certificate
  from the cluster CA. Its role (``PeerIdentity``) decides what it may send: a node
  certificate anything, a client certificate only admin requests.
- ``NodeTls.node_client`` (our links to peers: push-pull and the data plane): presents our
  node certificate, verifies the peer's against the CA and checks that the address we dialled
  is one of its SANs.
- ``NodeTls.client_server`` (the native client port and HTTP): the node certificate;
  client certificates optional, verified against the CA when presented (identity there
  comes from auth tokens).
- ``client_context`` (programs and the CLI): trusts the CA, optionally presents a client
  certificate (needed for admin commands on a node port).

Material is checked when loaded, so a mistake fails at start with the file named (missing,
not PEM, key not matching the certificate, certificate not from the CA, expired) instead
of as handshake failures later.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from leaderless.security.pki import (
    CLIENT_OU,
    NODE_OU,
    PkiError,
    issued_by,
    load_certificate,
    role_of,
)

TLS_VERSION_MIN = ssl.TLSVersion.TLSv1_2
"""TLS 1.0 and 1.1 are broken or deprecated (RFC 8996); 1.3 is preferred when both speak it."""
TLS_HANDSHAKE_TIMEOUT_S = 10.0
"""A handshake not finished by then is abandoned: a slow or silent peer must not hold a
connection slot (the default of asyncio, 60 s, is too generous for a cluster)."""
NODE_ROLE = "node"
CLIENT_ROLE = "client"
TLS_READ_CHUNK_BYTES = 16 * 1024
"""Application bytes taken from a session per read call: a TLS record carries at most
16 KiB (RFC 8446, 5.1) and OpenSSL returns one record per read, so a larger buffer would
only cost a larger allocation per call."""
ENV_CA = "LEADERLESS_TLS_CA"
ENV_CERT = "LEADERLESS_TLS_CERT"
ENV_KEY = "LEADERLESS_TLS_KEY"
"""The client side (CLI, programs) reads these; a node reads the same names for its own
``[tls]`` settings (``config``)."""


class TlsError(Exception):
    """TLS material cannot be used; the message names the setting, the file and what to do."""


# -- who is at the other end --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerIdentity:
    """A verified peer certificate's role (its OU) and name (its CN)."""

    role: str
    """``node`` or ``client``."""
    name: str

    @classmethod
    def from_ssl_object(cls, ssl_object: Any) -> PeerIdentity | None:
        """The identity of the verified certificate on ``ssl_object`` (an
        ``ssl.SSLObject``/``SSLSocket``); None without a verified certificate or without a
        leaderless role."""
        if ssl_object is None:
            return None
        cert = ssl_object.getpeercert()
        if not cert:  # None: no certificate; {}: one that was not verified
            return None
        units: set[str] = set()
        names: list[str] = []
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "organizationalUnitName":
                    units.add(value)
                elif key == "commonName":
                    names.append(value)
        role = NODE_ROLE if NODE_OU in units else CLIENT_ROLE if CLIENT_OU in units else None
        if role is None or len(names) != 1 or not names[0]:
            return None
        return cls(role, names[0])

    def __str__(self) -> str:
        return f"{self.role} {self.name}"


def peer_frame_refusal(identity: PeerIdentity, *, admin_request: bool,
                       announced_name: str | None = None) -> str | None:
    """Why the node port refuses a frame from ``identity``, or None if it may send it:
    only nodes send peer frames, and a node announces (``PeerHello``) its certificate's
    name, not another node's."""
    if not admin_request and identity.role != NODE_ROLE:
        return (f"a {identity.role} certificate ({identity.name}) may send only admin "
                "requests on the node port")
    if announced_name is not None and announced_name != identity.name:
        return (f"announced name {announced_name!r} is not its certificate's name "
                f"{identity.name!r}")
    return None


_SSL_PREFIX = re.compile(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\] ")
_SSL_SUFFIX = re.compile(r" \(_ssl\.c:\d+\)$")


def tls_failure_reason(exc: BaseException) -> str:
    """A TLS failure in words, e.g. ``certificate verify failed: unable to get local
    issuer certificate`` (OpenSSL's text without its code location)."""
    if isinstance(exc, ssl.SSLError):
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        return _SSL_SUFFIX.sub("", _SSL_PREFIX.sub("", text)).strip() or type(exc).__name__
    return str(exc) or type(exc).__name__


# -- the server side of a connection, without I/O -----------------------------------------


class TlsSession:
    """TLS for one inbound connection over memory buffers: bytes from the socket in,
    application bytes and bytes for the socket out. No I/O of its own, so the connection
    sees the handshake end (or fail, with OpenSSL's reason) in the same call that fed it
    the peer's bytes, on any event loop."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False
        """The handshake finished: the peer's certificate is verified."""
        self.closed = False
        """The peer ended TLS (close_notify)."""
        self.failed = False
        """TLS failed (an error was raised): the connection is to be closed."""
        self.received_bytes = 0

    def receive(self, data: bytes) -> bytes:
        """Feed bytes read from the socket; the application bytes they complete (maybe
        none). Raises ssl.SSLError if the handshake or a record fails; send ``outgoing()``
        after every call, also after an error (the alert tells the peer why)."""
        self.received_bytes += len(data)
        self._incoming.write(data)
        if not self.established:
            try:
                self.ssl_object.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            except ssl.SSLError:
                self.failed = True
                raise
            self.established = True
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self.ssl_object.read(TLS_READ_CHUNK_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            except ssl.SSLError:
                self.failed = True
                raise
            if not chunk:
                break
            chunks.append(chunk)
            if not self._incoming.pending and not self.ssl_object.pending():
                break  # all consumed: spare the read that would only raise WantRead
        return b"".join(chunks)

    def abandoned(self) -> bool:
        """The peer started a handshake and went away before it ended, without an error
        on our side: typically it refused our certificate (its alert may not be sent)."""
        return not self.established and not self.failed and self.received_bytes > 0

    def encrypt(self, data: bytes) -> bytes:
        """The TLS records carrying ``data`` (call only once ``established``)."""
        assert self.established, "nothing may be sent before the handshake ends"
        view = memoryview(data)
        while view:
            written = self.ssl_object.write(view)
            view = view[written:]
        return self._outgoing.read()

    def outgoing(self) -> bytes:
        """Bytes the session wants sent (handshake messages, tickets, alerts)."""
        return self._outgoing.read()


# -- contexts -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeTls:
    """A node's three contexts, from ``[tls]`` (``ca``, ``cert``, ``key``)."""

    node_server: ssl.SSLContext
    node_client: ssl.SSLContext
    client_server: ssl.SSLContext
    name: str
    """Our certificate's CN: what peers check our ``PeerHello`` against."""
    not_after: datetime.datetime

    @classmethod
    def load(cls, ca: Path, cert: Path, key: Path) -> NodeTls:
        """Check the material (a node certificate from this CA, its key, in date) and build
        the contexts; TlsError names the file that is wrong."""
        leaf = _check_material(ca, cert, key, _NODE_LABELS)
        if role_of(leaf) != NODE_ROLE:
            raise TlsError(f"tls.cert {cert}: is not a node certificate (OU={NODE_OU}); issue "
                           "one with `leaderless certs issue NODE --ca DIR`")
        server = _server_context(ca, cert, key, ssl.CERT_REQUIRED)
        client = _client_context(ca, cert, key)
        clients = _server_context(ca, cert, key, ssl.CERT_OPTIONAL)
        cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return cls(server, client, clients, str(cns[0].value), leaf.not_valid_after_utc)


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """What a program or the CLI needs to reach a TLS cluster: the CA, and for admin
    requests on a node port a client certificate and its key."""

    ca: Path | str
    cert: Path | str | None = None
    key: Path | str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context; TlsError names the file that is wrong."""
        return client_context(self.ca, self.cert, self.key)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientTls | None:
        """From ``LEADERLESS_TLS_CA`` (and ``_CERT``, ``_KEY``); None when the CA is unset."""
        env = os.environ if environ is None else environ
        ca, cert, key = env.get(ENV_CA), env.get(ENV_CERT), env.get(ENV_KEY)
        if not ca:
            if cert or key:
                raise TlsError(f"{ENV_CERT}/{ENV_KEY} are set but {ENV_CA} is not; set it to "
                               "the cluster's ca.crt")
            return None
        return cls(ca, cert or None, key or None)


def client_context(ca: Path | str, cert: Path | str | None = None,
                   key: Path | str | None = None) -> ssl.SSLContext:
    """For programs and the CLI: trust the cluster CA, check the node's address against
    its SANs, and present ``cert``/``key`` if given (both or neither)."""
    ca = Path(ca)
    if (cert is None) != (key is None):
        raise TlsError(f"give both {ENV_CERT} and {ENV_KEY} (a client certificate and its "
                       "key), or neither")
    if cert is None or key is None:
        _check_ca(ca, _CLIENT_LABELS)
        return _client_context(ca, None, None)
    _check_material(ca, Path(cert), Path(key), _CLIENT_LABELS)
    return _client_context(ca, Path(cert), Path(key))


def client_ssl(tls: ClientTls | None, ssl_context: ssl.SSLContext | None
               ) -> ssl.SSLContext | None:
    """The context a client constructor was given as ``tls=`` or ``ssl_context=``."""
    if tls is not None and ssl_context is not None:
        raise ValueError("give tls= or ssl_context=, not both")
    return tls.context() if tls is not None else ssl_context


def _server_context(ca: Path, cert: Path, key: Path, verify: ssl.VerifyMode) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSION_MIN
    _load(context, ca, cert, key)
    context.verify_mode = verify
    return context


def _client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, checks the host name
    context.minimum_version = TLS_VERSION_MIN
    _load(context, ca, cert, key)
    return context


def _load(context: ssl.SSLContext, ca: Path, cert: Path | None, key: Path | None) -> None:
    # The files were checked just before; this only fails if they changed meanwhile or
    # OpenSSL refuses what cryptography accepted.
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{ca}: OpenSSL cannot load it as a CA: {tls_failure_reason(exc)}"
                       ) from None
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"{cert} with {key}: OpenSSL cannot load them: "
                           f"{tls_failure_reason(exc)}") from None


# -- checking the material ----------------------------------------------------------------

_NODE_LABELS = ("tls.ca", "tls.cert", "tls.key")
_CLIENT_LABELS = (ENV_CA, ENV_CERT, ENV_KEY)


def _check_ca(ca: Path, labels: tuple[str, str, str]) -> x509.Certificate:
    try:
        cert = load_certificate(ca)
    except PkiError as exc:
        raise TlsError(f"{labels[0]} {exc}") from None
    if role_of(cert) != "ca":
        raise TlsError(f"{labels[0]} {ca}: is not a CA certificate; give the ca.crt made by "
                       "`leaderless certs init`")
    return cert


def _check_material(ca: Path, cert: Path, key: Path,
                    labels: tuple[str, str, str]) -> x509.Certificate:
    """The leaf certificate, once it is known to be from ``ca``, in date, and ``key``'s."""
    ca_cert = _check_ca(ca, labels)
    try:
        leaf = load_certificate(cert)
    except PkiError as exc:
        raise TlsError(f"{labels[1]} {exc}") from None
    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except FileNotFoundError:
        raise TlsError(f"{labels[2]} {key}: no such file") from None
    except OSError as exc:
        raise TlsError(f"{labels[2]} {key}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, TypeError):
        raise TlsError(f"{labels[2]} {key}: is not a PEM private key without a password"
                       ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise TlsError(f"{labels[2]} {key}: is not the key of {labels[1]} {cert}; give the "
                       "key issued with that certificate")
    if not issued_by(leaf, ca_cert):
        raise TlsError(f"{labels[1]} {cert}: was not issued by the CA in {labels[0]} {ca}; "
                       "issue it with `leaderless certs issue NAME --ca DIR` from this CA")
    now = datetime.datetime.now(datetime.UTC)
    for path, label, checked in ((ca, labels[0], ca_cert), (cert, labels[1], leaf)):
        if checked.not_valid_after_utc < now:
            raise TlsError(f"{label} {path}: expired on "
                           f"{checked.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; issue a new one")
        if checked.not_valid_before_utc > now:
            raise TlsError(f"{label} {path}: is not valid before "
                           f"{checked.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this "
                           "machine's clock")
    return leaf
