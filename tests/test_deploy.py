"""The deployment helpers that need no running process: certificates, node keys, command lines,
and the checks `twist-fl deploy local` makes before it starts anything."""

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.config import parse_config_args

from twist_fl.deploy.certs import make_certificates, make_node_key
from twist_fl.deploy.local import config_string, deploy_local
from twist_fl.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tls_handshake(paths, host: str) -> str:
    client = ssl.create_default_context(cafile=str(paths["ca"]))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(paths["cert"]), str(paths["key"]))
    a, b = socket.socketpair()
    with a, b:
        def serve():
            try:
                with server.wrap_socket(a, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        t = threading.Thread(target=serve)
        t.start()
        try:
            with client.wrap_socket(b, server_hostname=host):
                return "ok"
        except ssl.SSLCertVerificationError as e:
            return str(e)
        finally:
            b.close()
            t.join(10)


def test_server_certificate_names_every_host_and_chains_to_the_ca(tmp_path):
    paths = make_certificates(tmp_path, ["10.0.0.5", "link.example.org"])

    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                           ipaddress.ip_address("10.0.0.5")}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # A real handshake with Python's TLS stack (what Flower's HTTP client uses), by IP and by name.
    for host in ("127.0.0.1", "localhost", "link.example.org"):
        assert tls_handshake(paths, host) == "ok"
    assert "certificate verify failed" in tls_handshake(paths, "other.example.org")
    assert stat.S_IMODE(paths["key"].stat().st_mode) == 0o600
    assert stat.S_IMODE(paths["ca_key"].stat().st_mode) == 0o600


def test_bad_host_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="host 'two words' is neither an IP address nor a DNS name"):
        make_certificates(tmp_path, ["two words"])


def test_node_key_is_an_ec_p384_openssh_pair(tmp_path):
    key, pub = make_node_key(tmp_path / "keys" / "node-0")

    private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pub.read_bytes())
    assert isinstance(private.curve, ec.SECP384R1) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_config_string_is_parsed_back_by_flower():
    values = {"partition-id": 3, "num-partitions": 4, "twist-mode": "masked", "twist-capacity": 0.5,
              "weighted-average": False, "out-dir": "/tmp/a b", "twist-fault": "1:nan,2:shape"}

    assert parse_config_args([config_string(values)]) == values
    with pytest.raises(ValueError, match="must be a bool, int, float or str"):
        config_string({"k": [1, 2]})


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "--nodes=0; allowed: 1 or more"),
    ({"modes": ["true", "fast"]}, "--modes entry 'fast' is not allowed; allowed: ['true', 'masked']"),
    ({"capacities": [1.0, 1.5]}, "--capacities entry 1.5 is not allowed; allowed: numbers in (0, 1]"),
])
def test_deploy_local_refuses_bad_arguments_before_starting_anything(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        deploy_local(tmp_path / "d", ROOT, **kwargs)
    assert not (tmp_path / "d").exists()


def test_deploy_local_needs_an_app_folder_and_a_fresh_dir(tmp_path, capsys):
    assert main(["deploy", "local", "--app", str(tmp_path), "--dir", str(tmp_path / "d")]) == 2
    assert "is not a Flower app folder" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "superlink.db").write_bytes(b"")
    assert main(["deploy", "local", "--app", str(ROOT), "--dir", str(tmp_path / "used")]) == 2
    assert "already holds a deployment" in capsys.readouterr().err


def test_cli_writes_certificates_and_keys(tmp_path, capsys):
    assert main(["deploy", "certs", "--out", str(tmp_path / "certs"), "--host", "192.168.1.7"]) == 0
    assert main(["deploy", "node-key", "--out", str(tmp_path / "node.key")]) == 0
    assert (tmp_path / "certs" / "server.pem").is_file() and (tmp_path / "node.key.pub").is_file()
    assert '"ca":' in capsys.readouterr().out
