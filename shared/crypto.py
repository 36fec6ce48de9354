"""Crypto helpers: a dev CA and TLS certificates, Ed25519 device keys, piece signatures.

TLS (the project's gRPC services): :func:`write_dev_certs` makes a directory with a dev CA
(``ca.pem``, ``ca.key``) and a server certificate (``server.pem``, ``server.key``) for the
given host names and IP addresses (ECDSA P-256, SHA-256). Servers load
:func:`load_server_credentials`; clients trust ``ca.pem`` (:func:`load_root_certificate`).

Device keys: Ed25519. A sharer signs each piece it submits; the pool and targets verify.
The signed message is :func:`piece_signing_message`: a domain tag, the 32 raw bytes of the
piece's content id and the sharer pseudonym, so a signature binds content and provenance.
A device signs each call to the inference service (:func:`sign_request`): the call's
method, time, nonce and request body, so the service knows which key asks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import PflError
from shared.files import write_atomic

SIGNATURE_DOMAIN = b"pfl-piece-sig/1"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


class SignatureError(PflError):
    """A signature is missing, malformed or does not verify."""


# ------------------------------------------------------------------------ dev CA / TLS
def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pfl dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def create_ca(common_name: str = "pfl dev CA", days: int = 3650
              ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (ECDSA P-256) that may sign leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                      hosts: Iterable[str], days: int = 825
                      ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate signed by the CA, valid for ``hosts`` (names and IPs)."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise PflError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=True, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM bytes of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    """Unencrypted PKCS#8 PEM bytes of a private key (keep the file 0600)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class DevCerts:
    """Paths of a dev certificate directory."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY


def write_dev_certs(directory: str | Path, hosts: Iterable[str] = ("localhost", "127.0.0.1"),
                    *, new_ca: bool = False) -> DevCerts:
    """Create (or reuse) the dev CA in ``directory`` and issue a server certificate for hosts.

    An existing ``ca.pem``/``ca.key`` pair is reused unless ``new_ca``, so clients that
    already trust the CA keep working; the server certificate is always issued afresh.
    """
    certs = DevCerts(Path(directory))
    if not new_ca and certs.ca_cert.is_file() and certs.ca_key.is_file():
        ca_cert = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    else:
        ca_key, ca_cert = create_ca()
        write_atomic(certs.ca_key, key_pem(ca_key), private=True)
        write_atomic(certs.ca_cert, cert_pem(ca_cert))
    server_key, server_cert = issue_server_cert(ca_key, ca_cert, hosts)
    write_atomic(certs.server_key, key_pem(server_key), private=True)
    write_atomic(certs.server_cert, cert_pem(server_cert))
    return certs


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PflError(f"cannot read the {what} {path}: {exc.strerror} "
                       f"(create one with `pfl certs {path.parent}`)") from None


def load_server_credentials(directory: str | Path) -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM) of the server in a dev certificate directory."""
    certs = DevCerts(Path(directory))
    return _read(certs.server_cert, "server certificate"), _read(certs.server_key, "server key")


def load_root_certificate(path: str | Path) -> bytes:
    """The PEM of a CA certificate: ``path`` is the file or a dev certificate directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CA_CERT
    return _read(path, "CA certificate")


def verify_server_cert(cert_pem_bytes: bytes, ca_pem_bytes: bytes, host: str) -> None:
    """Check that a server certificate chains to the CA and is valid for ``host``.

    Raises ``PflError`` naming the reason otherwise (RFC 5280 path validation).
    """
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    cert = x509.load_pem_x509_certificate(cert_pem_bytes)
    ca = x509.load_pem_x509_certificate(ca_pem_bytes)
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    try:
        verifier.verify(cert, [])
    except VerificationError as exc:
        raise PflError(f"certificate not valid for {host}: {exc}") from None


# ---------------------------------------------------------------------- device keys
def generate_device_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 device key."""
    return Ed25519PrivateKey.generate()


def save_device_key(key: Ed25519PrivateKey, path: str | Path,
                    password: bytes | None = None) -> Path:
    """Write the key as PKCS#8 PEM (0600), encrypted when a password is given."""
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            encryption)
    return write_atomic(path, pem, private=True)


def load_device_key(path: str | Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """Read an Ed25519 device key written by :func:`save_device_key`."""
    data = _read(Path(path), "device key")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise PflError(f"cannot load the device key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PflError(f"{path} is not an Ed25519 key")
    return key


def device_key(path: str | Path) -> Ed25519PrivateKey:
    """The device key at ``path``, created (and saved) on first use."""
    if Path(path).is_file():
        return load_device_key(path)
    key = generate_device_key()
    save_device_key(key, path)
    return key


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key (of a private or public key)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes (``SignatureError`` if malformed)."""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SignatureError(f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(bytes(raw))


def key_fingerprint(raw: bytes) -> str:
    """A short hex fingerprint of a raw public key, for display."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(raw)
    return digest.finalize().hex()[:16]


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``message``."""
    return key.sign(message)


def verify(public_key: bytes | Ed25519PublicKey, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature; raise :class:`SignatureError` if it does not verify."""
    if not signature:
        raise SignatureError("missing signature")
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    if not public_key:
        raise SignatureError("missing public key")
    key = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
    try:
        key.verify(bytes(signature), message)
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None


# -------------------------------------------------------------------- piece signatures
def piece_signing_message(piece_id: str, sharer: str) -> bytes:
    """What a sharer signs: domain tag, NUL, the 32 id bytes, NUL, the UTF-8 pseudonym."""
    try:
        id_bytes = bytes.fromhex(piece_id)
    except ValueError:
        id_bytes = b""
    if len(id_bytes) != 32:
        raise SignatureError(f"piece id must be 64 hex digits, got {piece_id!r}")
    return SIGNATURE_DOMAIN + b"\0" + id_bytes + b"\0" + sharer.encode("utf-8")


def sign_piece(key: Ed25519PrivateKey, piece_id: str, sharer: str) -> bytes:
    """The sharer's signature over (piece id, pseudonym)."""
    return sign(key, piece_signing_message(piece_id, sharer))


def verify_piece(public_key: bytes, piece_id: str, sharer: str, signature: bytes) -> None:
    """Check a piece signature; raise :class:`SignatureError` naming the piece otherwise."""
    try:
        verify(public_key, piece_signing_message(piece_id, sharer), signature)
    except SignatureError as exc:
        raise SignatureError(f"piece {piece_id[:12]} from {sharer!r}: {exc}") from None


# ------------------------------------------------------------------ signed requests
REQUEST_DOMAIN = b"pfl-request/1"
#: the gRPC metadata of a signed request: the device's raw public key, the signing time
#: (unix milliseconds), a random nonce and the signature
REQUEST_KEY, REQUEST_TIME, REQUEST_NONCE, REQUEST_SIG = (
    "pfl-key-bin", "pfl-time", "pfl-nonce-bin", "pfl-sig-bin")
NONCE_BYTES = 16


def request_signing_message(method: str, body: bytes, time_ms: int, nonce: bytes) -> bytes:
    """What a device signs for one call: domain tag, the gRPC method, the time, the nonce and
    the sha256 of the request's deterministic serialization, NUL-separated."""
    return b"\0".join((REQUEST_DOMAIN, method.encode("utf-8"), str(int(time_ms)).encode(),
                       bytes(nonce), hashlib.sha256(body).digest()))


def sign_request(key: Ed25519PrivateKey, method: str, body: bytes, *,
                 time_ms: int | None = None, nonce: bytes | None = None
                 ) -> tuple[tuple[str, bytes | str], ...]:
    """The metadata that signs one call of ``method`` whose request serializes (deterministic)
    to ``body``, with the device key ``key``."""
    time_ms = int(time.time() * 1000) if time_ms is None else int(time_ms)
    nonce = os.urandom(NONCE_BYTES) if nonce is None else bytes(nonce)
    signature = sign(key, request_signing_message(method, body, time_ms, nonce))
    return ((REQUEST_KEY, public_key_bytes(key)), (REQUEST_TIME, str(time_ms)),
            (REQUEST_NONCE, nonce), (REQUEST_SIG, signature))


def read_public_keys(path: str | Path) -> frozenset[bytes]:
    """Raw device public keys from a text file: one key a line as 64 hex digits (what
    ``pfl device-key`` prints), blank lines and ``#`` comments ignored."""
    keys = set()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise PflError(f"cannot read the client key list {path}: {exc.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            raw = bytes.fromhex(line)
        except ValueError:
            raw = b""
        if len(raw) != PUBLIC_KEY_BYTES:
            raise PflError(f"{path}:{number}: not a public key (64 hex digits, from "
                           "`pfl device-key`)")
        keys.add(raw)
    if not keys:
        raise PflError(f"{path}: no public keys")
    return frozenset(keys)


# ---------------------------------------------------------------------- sharer grants
GRANT_DOMAIN = b"pfl-grant/1"
FEDERATION_KEY = "federation.key"   # the cloud server's grant-signing key (private)
FEDERATION_PUB = "federation.pub"   # its raw public key, which the pool trusts


def grant_signing_message(grant_id: str, run: str, max_pieces: int, expires_at: float,
                          public_key: bytes = b"") -> bytes:
    """What the federation key signs: domain tag, NUL, canonical JSON of the grant's fields
    (the device key it is bound to included)."""
    body = json.dumps({"expires_at": float(expires_at).hex(), "grant_id": str(grant_id),
                       "max_pieces": int(max_pieces), "public_key": bytes(public_key).hex(),
                       "run": str(run)},
                      sort_keys=True, separators=(",", ":"))
    return GRANT_DOMAIN + b"\0" + body.encode("utf-8")


def write_federation_key(directory: str | Path) -> tuple[Path, Path]:
    """Create (or reuse) the federation's grant-signing key in ``directory``: returns the
    paths of the private key (the cloud server's) and of the raw public key (the pool's)."""
    directory = Path(directory)
    private, public = directory / FEDERATION_KEY, directory / FEDERATION_PUB
    key = device_key(private)
    write_atomic(public, public_key_bytes(key))
    return private, public


def write_supernode_key(path: str | Path) -> tuple[Path, Path]:
    """Create (or reuse) a SuperNode's authentication key: an EC P-384 key pair in OpenSSH
    form, as flower-supernode ``--auth-supernode-private-key`` reads it, at ``path`` (mode
    0600) and ``path.pub`` (what the operator registers with ``flwr supernode register``).
    The device makes it; its private half never leaves the device."""
    private = Path(path)
    public = private.with_name(private.name + ".pub")
    if private.is_file():
        key = serialization.load_ssh_private_key(_read(private, "SuperNode key"), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PflError(f"{private}: not an EC private key")
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        write_atomic(private, key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()), private=True)
    write_atomic(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH)
                 + b"\n")
    return private, public


def load_federation_public_key(path: str | Path) -> bytes:
    """The raw 32-byte public key in ``path`` (``federation.pub``)."""
    raw = _read(Path(path), "federation public key")
    if len(raw) != 32:
        raise PflError(f"{path}: not a raw Ed25519 public key ({len(raw)} bytes, want 32)")
    return raw


def sharer_pseudonym(public_key: bytes) -> str:
    """The pseudonym a sharer's pieces carry: derived from its device's public key."""
    return "sharer-" + key_fingerprint(public_key)[:16]


def key_to_array(public_key: bytes):
    """A 32-byte public key as 32 float32 byte values (how it travels in an ArrayRecord)."""
    return np.frombuffer(public_key, dtype=np.uint8).astype(np.float32)


def key_from_array(values) -> bytes | None:
    """Inverse of :func:`key_to_array` (None when it is not 32 byte values)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size != 32 or not np.all((array >= 0) & (array <= 255) & (array == np.round(array))):
        return None
    return bytes(array.astype(np.uint8).tolist())


def tls_channel(target: str, root_certificates: bytes | str | Path, *,
                max_message_bytes: int, server_name: str | None = None,
                interceptors: Sequence = ()):
    """``(channel, intercepted)``: a gRPC channel to ``target`` over TLS that trusts only
    ``root_certificates`` (CA PEM bytes, a PEM file or a `pfl certs` directory), and the same
    channel through ``interceptors`` (what stubs use). ``server_name`` overrides the TLS host
    name. Close ``channel`` when done."""
    import grpc

    if not isinstance(root_certificates, bytes):
        root_certificates = load_root_certificate(root_certificates)
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    channel = grpc.secure_channel(target, credentials, options=options)
    return channel, (grpc.intercept_channel(channel, *interceptors) if interceptors
                     else channel)
