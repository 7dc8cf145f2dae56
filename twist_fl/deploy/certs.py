"""Certificates and keys for a secure deployment.

`make_certificates` writes a CA and a server certificate signed by it, with subject alternative
names for every host the SuperLink is reached by (TLS for a test deployment or a small private
one); `make_node_key` writes an EC (SECP384R1) key pair in OpenSSH format, the kind
`flower-supernode --auth-supernode-private-key` and `flwr supernode register` take. Every file
is written atomically; private keys are created with mode 600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from pathlib import Path

from ..core.io import atomic_write_bytes, check_output

log = logging.getLogger(__name__)

CERT_FILES = {"ca": "ca.crt", "ca_key": "ca.key", "cert": "server.pem", "key": "server.key"}
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_host(host: str) -> str:
    """`host` if it is an IP address or a DNS name (RFC 1123 labels), else ValueError."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"host {host!r} is neither an IP address nor a DNS name (letters, digits and '-' in "
                         "dot-separated labels, e.g. 10.0.0.5 or link.example.org; no scheme, port or path)")
    return host


MAX_DAYS = 365 * 100  # a century: far past any deployment, well before X.509's year 9999


def make_certificates(out: Path, hosts: list[str] | None = None, days: int = 365,
                      force: bool = False) -> dict[str, Path]:
    """A CA (ca.crt, ca.key) and a server certificate it signs (server.pem, server.key) whose
    subject alternative names are `hosts` (IP addresses or DNS names) plus 127.0.0.1 and localhost,
    valid for `days` (>= 1). Give the SuperLink ca.crt, server.pem and server.key; give SuperNodes
    and `flwr` ca.crt. Existing files are never replaced unless `force` (a CA that nodes already
    trust would be lost)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"--days={days!r} is not allowed; allowed: 1..{MAX_DAYS} days of validity (X.509 dates end "
                         "in the year 9999)")
    hosts = [check_host(h) for h in (hosts or [])]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; certificates go into a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / name for k, name in CERT_FILES.items()}
    for p in paths.values():
        check_output(p, force=force, kind="file")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    names: list[x509.GeneralName] = []
    for h in ["127.0.0.1", "localhost", *hosts]:
        try:
            gn: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(h))
        except ValueError:
            gn = x509.DNSName(h)
        if gn not in names:
            names.append(gn)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twist-fl test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[-1].value))]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
              .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    atomic_write_bytes(paths["ca"], ca.public_bytes(pem))
    atomic_write_bytes(paths["cert"], server.public_bytes(pem))
    for p, k in ((paths["ca_key"], ca_key), (paths["key"], key)):
        private = k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        atomic_write_bytes(p, private, 0o600)
    log.info("certificates in %s for %s", out, [str(n.value) for n in names])
    return paths


def make_node_key(path: Path, force: bool = False) -> tuple[Path, Path]:
    """An EC SECP384R1 key pair for SuperNode authentication: `path` (private, OpenSSH, mode 600)
    and `path`.pub (OpenSSH public key, what the SuperLink's operator registers). A `path` ending
    in .pub is refused (the private key would go where the public one is expected), and existing
    key files are never replaced unless `force` (a registered key would be lost)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    if path.suffix == ".pub":
        raise ValueError(f"--out {str(path)!r} ends in .pub: give the PRIVATE key's path (e.g. node.key); its "
                         "public half is written beside it as <out>.pub")
    if path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a folder: give the private key's file path, e.g. {path / 'node.key'}")
    pub = path.with_name(path.name + ".pub")
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, pub):
        check_output(p, force=force, kind="file")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(path, private, 0o600)
    atomic_write_bytes(pub, public + b"\n")
    return path, pub
