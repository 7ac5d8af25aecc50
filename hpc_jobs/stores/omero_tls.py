"""OMERO client connections with the server's certificate checked (CA pinning).

omero-py turns server-certificate checks off by default: ``omero.client._initData`` sets
``IceSSL.VerifyPeer=0`` unless the property is already set (omero-py
``src/omero/clients.py``, ``_optSetProp(id, "IceSSL.VerifyPeer", "0")``). A machine in the
middle can then present any certificate and read the session key of a join. A site pins its
server's CA by giving a PEM file (``ca_file``): we pass IceSSL properties in the client's
property map, which ``_optSetProp`` leaves alone:

- ``IceSSL.CAs=<ca_file>``: the only trusted CA (Ice 3.6 IceSSL property reference);
- ``IceSSL.VerifyPeer=1``: abort the connection when the server's certificate does not verify;
- ``IceSSL.CheckCertName=1``: the certificate must name the host we connect to;
- ``IceSSL.Ciphers``: no anonymous (certificate-less) Diffie-Hellman suites, which OMERO
  servers without a certificate offer (``omero.glacier2.IceSSL.Ciphers`` default
  ``ADH:...``, omero-py ``src/omero/plugins/admin.py``); with them there is nothing to verify.

The server needs a certificate signed by that CA (e.g. from the ``omero-certificates``
plugin, or the site's own CA): see docs/omero.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpc_jobs.stores.base import StoreError

#: OpenSSL cipher list without anonymous suites (used only when a CA is pinned).
PINNED_CIPHERS = "HIGH:!aNULL:!ADH:!LOW:!MD5:!EXP:!3DES"


def tls_properties(
    ca_file: str | Path | None, tls_name: str | None = None
) -> dict[str, str]:
    """Ice properties that make the client verify the server against ``ca_file``.

    Empty without a CA (omero-py's default: encrypted, not authenticated). A CA file that is
    missing is an error, never a silent fallback to no checks. ``tls_name``: the client
    connects through another address than the server's name (the reverse tunnel's
    ``127.0.0.1``), so the name check is made against ``tls_name`` instead: the certificate's
    subject must carry ``CN=<tls_name>`` (``IceSSL.TrustOnly.Client``; ``CheckCertName``
    would compare it with 127.0.0.1).
    """
    if not ca_file:
        return {}
    ca = Path(ca_file)
    if not ca.is_file():
        raise StoreError(
            f"OMERO CA file {ca} does not exist: set store.ca_file (site.toml) or the "
            "connection extra 'ca_file' to the PEM file of the CA that signed the OMERO "
            "server's certificate"
        )
    props = {
        "IceSSL.CAs": str(ca.resolve()),
        "IceSSL.VerifyPeer": "1",
        "IceSSL.CheckCertName": "1",
        "IceSSL.Ciphers": PINNED_CIPHERS,
    }
    if tls_name:
        props["IceSSL.CheckCertName"] = "0"
        props["IceSSL.TrustOnly.Client"] = f"CN={tls_name}"
    return props


def new_client(
    host: str, port: int, ca_file: str | Path | None = None, tls_name: str | None = None
) -> Any:
    """An ``omero.client`` for ``host:port`` (no session yet), CA-pinned when ``ca_file``
    (the certificate checked for ``tls_name`` when given, else for ``host``)."""
    import omero  # omero/__init__.py exposes omero.client (src/omero/clients.py)

    pmap = tls_properties(ca_file, tls_name)
    return omero.client(host=str(host), port=int(port), pmap=pmap)
