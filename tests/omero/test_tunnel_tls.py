"""CA pinning through the reverse tunnel, with real IceSSL (the OMERO lane: Python 3.10).

Through the tunnel a job connects to ``127.0.0.1:<listen_port>``, not to the server's name,
so the usual check (the certificate names the host connected to) would refuse every real
server. The store checks the certificate for the configured OMERO host instead
(``StoreConfig.tls_name``, set by :func:`hpc_jobs.tunnel.route_job`). A TLS server on
loopback with a certificate for ``omero.example.org`` stands in for OMERO behind the tunnel:
the handshake passing (then "no OMERO answers") or failing is what is checked.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc_jobs.config import StoreConfig
from hpc_jobs.protocol import Secrets
from hpc_jobs.stores import open_store
from hpc_jobs.stores.base import StoreError

pytest.importorskip("omero.gateway")

KEY = "0123456789abcdef"
NAME = "omero.example.org"


@pytest.fixture
def server_behind_tunnel(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server on 127.0.0.1 whose self-signed certificate names only ``NAME``."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={NAME}",
         "-addext", f"subjectAltName=DNS:{NAME}", "-keyout", str(key), "-out", str(cert),
         "-days", "1"],
        check=True, capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(16)
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], cert
    srv.close()


def _join(port: int, ca: Path, tls_name: str | None) -> str:
    store = StoreConfig(kind="omero", host="127.0.0.1", port=port, ca_file=ca,
                        tls_name=tls_name)
    with pytest.raises(StoreError) as err:  # no OMERO behind the TLS: it always ends in error
        open_store(store, Secrets(omero_session_key=KEY))
    return str(err.value)


def test_through_the_tunnel_the_certificate_is_checked_for_the_omero_host(
    server_behind_tunnel: tuple[int, Path],
) -> None:
    port, ca = server_behind_tunnel
    # the routed config (127.0.0.1 + the real name): TLS passes, only OMERO is missing
    assert "TLS handshake" not in _join(port, ca, NAME)
    # without the name the certificate is checked for 127.0.0.1, which it does not name
    assert "TLS handshake" in _join(port, ca, None)
    # a server whose certificate names another host is still refused through the tunnel
    assert "TLS handshake" in _join(port, ca, "other.example.org")
