"""What of the OMERO adapter can be checked without omero-py or a server."""

from __future__ import annotations

import importlib.util

import pytest

from hpc_jobs.config import StoreConfig
from hpc_jobs.stores import open_store
from hpc_jobs.stores.base import StoreError
from hpc_jobs.stores.omero import (
    INSTALL_HINT,
    OmeroStore,
    format_points,
    namespace_of,
    parse_points,
)

HAVE_OMERO = importlib.util.find_spec("omero") is not None


def test_points_round_trip() -> None:
    pts = ((1.5, 2.25), (1e-3, 12345.678), (100.0, 0.0))
    assert format_points(pts) == "1.5,2.25 0.001,12345.678 100.0,0.0"
    assert parse_points(format_points(pts)) == pts
    assert parse_points("points[1,2, 3,4, 5,6] points1[1,2, 3,4, 5,6]") == ((1, 2), (3, 4), (5, 6))
    assert parse_points("1, 2 3, 4 5, 6") == ((1, 2), (3, 4), (5, 6))


def test_namespace_in_description() -> None:
    assert namespace_of("omeflow:ns=omeflow/nuclei") == "omeflow/nuclei"
    assert namespace_of("drawn by Anna") is None
    assert namespace_of(None) is None


@pytest.mark.skipif(HAVE_OMERO, reason="omero-py is installed here")
def test_missing_omero_names_the_fix() -> None:
    with pytest.raises(StoreError, match=r"pip install 'omeflow\[omero\]'"):
        OmeroStore.join("omero.example.org", 4064, "key")
    assert "zeroc-ice" in INSTALL_HINT


@pytest.mark.skipif(HAVE_OMERO, reason="omero-py is installed here")
def test_open_store_omero_without_omero_py() -> None:
    cfg = StoreConfig(kind="omero", host="omero.example.org")
    with pytest.raises(StoreError, match="omero-py"):
        open_store(cfg, None)


def test_open_store_local(tmp_path) -> None:
    with open_store(StoreConfig(kind="local", path=tmp_path / "s")) as store:
        assert store.list_images() == []
        assert (tmp_path / "s" / "store.json").exists()


def test_ca_pinning_turns_peer_verification_on(tmp_path) -> None:
    """omero-py's default is IceSSL.VerifyPeer=0; a pinned CA must switch checks on."""
    from hpc_jobs.stores.omero_tls import tls_properties

    assert tls_properties(None) == {}
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    props = tls_properties(ca)
    assert props["IceSSL.CAs"] == str(ca.resolve())
    assert props["IceSSL.VerifyPeer"] == "1"
    assert props["IceSSL.CheckCertName"] == "1"
    assert "!ADH" in props["IceSSL.Ciphers"] and "!aNULL" in props["IceSSL.Ciphers"]
    with pytest.raises(StoreError, match=r"CA file .*missing\.pem does not exist.*ca_file"):
        tls_properties(tmp_path / "missing.pem")


def test_site_config_carries_the_ca_file(tmp_path) -> None:
    cfg = StoreConfig(kind="omero", host="omero.example.org", ca_file="certs/ca.pem")
    assert cfg.ca_file is not None and cfg.ca_file.name == "ca.pem"
