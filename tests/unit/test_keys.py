"""omeflow keys: file modes, authorized_keys line format, hostile input, rotate/revoke/list."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import stat
from pathlib import Path

import pytest

from hpc_jobs import keys
from hpc_jobs.keys import KeyStore, KeyStoreError, authorized_keys_line

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILfmEIgfJPyo5jfO111qhUZuGrar4P1PSTV3v4xfHW1d me@x"
GW = "/opt/omeflow-hpc/venv/bin/omeflow-gateway"
CFG = "/etc/omeflow/site.toml"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cli(tmp_path: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    keys.add_arguments(parser)
    args = parser.parse_args(["--keys-dir", str(tmp_path / "keys"), *argv])
    return keys.main(args)


CREATE = (
    "create", "--omero-user", "alice", "--hpc-user", "omeflow", "--host", "hpc.example.org",
    "--gateway", GW, "--config", CFG, "--from", "10.0.0.5", "--days", "90",
)


def _private_keys(tmp_path: Path) -> list[str]:
    return [
        p.read_text()
        for p in (tmp_path / "keys").rglob("id_ed25519_*")
        if not p.name.endswith(".pub")
    ]


# -- the pure line builder ---------------------------------------------------------------------
def test_line_format_exact() -> None:
    line = authorized_keys_line(PUB, GW, CFG, "10.0.0.5", dt.date(2030, 1, 2))
    assert line == (
        f'command="{GW} --config {CFG}",restrict,from="10.0.0.5",expiry-time="20300102" '
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILfmEIgfJPyo5jfO111qhUZuGrar4P1PSTV3v4xfHW1d me@x"
    )


def test_line_without_from_or_expiry_and_cidr_list() -> None:
    assert authorized_keys_line(PUB, GW, CFG).startswith(f'command="{GW} --config {CFG}",restrict ')
    line = authorized_keys_line(PUB, GW, CFG, ["10.0.0.5", "192.168.0.0/24"])
    assert ',from="10.0.0.5,192.168.0.0/24" ' in line


@pytest.mark.parametrize(
    ("gateway", "config", "from_"),
    [
        ('/opt/gw" ,permitopen="*', CFG, None),  # quote injection
        ("/opt/gw --evil", CFG, None),  # space
        ("relative/gw", CFG, None),  # not absolute
        (GW, "/etc/a,b.toml", None),  # comma
        (GW, "/etc/../root/x.toml", None),  # traversal
        (GW, CFG, '10.0.0.5",command="sh'),  # from= injection
        (GW, CFG, "10.0.0.0/8x"),
        (GW, CFG, "10.0.0.1/8"),  # host bits set
        (GW, CFG, "example.org"),
    ],
)
def test_line_refuses_hostile_input(gateway: str, config: str, from_: str | None) -> None:
    with pytest.raises(KeyStoreError):
        authorized_keys_line(PUB, gateway, config, from_)


def test_line_refuses_bad_public_key() -> None:
    with pytest.raises(KeyStoreError, match="public key"):
        authorized_keys_line("ssh-ed25519 AAAA\nssh-rsa BBBB", GW, CFG)
    with pytest.raises(KeyStoreError, match="public key"):
        authorized_keys_line('from="*" ssh-ed25519 AAAA', GW, CFG)


@pytest.mark.parametrize("name", ["", "-alice", "al ice", "alice;rm", "a" * 65, "ali\nce", "../x"])
def test_refuses_bad_omero_user(name: str) -> None:
    with pytest.raises(KeyStoreError, match="OMERO user"):
        keys.validate_omero_user(name)


@pytest.mark.parametrize("name", ["Root", "1abc", "a b", "x" * 33, "omeflow$"])
def test_refuses_bad_hpc_user(name: str) -> None:
    with pytest.raises(KeyStoreError, match="HPC user"):
        keys.validate_hpc_user(name)


@pytest.mark.parametrize("host", ["user@hpc", "hpc:22", "-oProxyCommand=x", "a..b", "h p"])
def test_refuses_bad_host(host: str) -> None:
    with pytest.raises(KeyStoreError, match="host"):
        keys.validate_host(host)


def test_accepts_reasonable_names() -> None:
    assert keys.validate_host("hpc.example.org") == "hpc.example.org"
    assert keys.validate_host("10.1.2.3") == "10.1.2.3"
    assert keys.validate_omero_user("alice.smith@lab") == "alice.smith@lab"
    assert keys.validate_hpc_user("svc_omeflow-1") == "svc_omeflow-1"


# -- the store and CLI ---------------------------------------------------------------------------
def test_create_prints_only_the_line_and_sets_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(tmp_path, *CREATE) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1
    expiry = (dt.datetime.now(dt.UTC) + dt.timedelta(days=90)).strftime("%Y%m%d")
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    assert re.fullmatch(
        rf'command="{GW} --config {CFG} --caller alice",restrict,from="10.0.0.5",'
        rf'expiry-time="{expiry}" ssh-ed25519 AAAA[A-Za-z0-9+/]+=* omeflow:alice@{today}',
        lines[0],
    )
    root = tmp_path / "keys"
    assert _mode(root) == 0o700
    assert _mode(root / "alice.keys") == 0o700
    record = json.loads((root / "alice.json").read_text())
    assert _mode(root / "alice.json") == 0o600
    key_file = Path(record["keys"][0]["key_file"])
    assert _mode(key_file) == 0o600
    assert "PRIVATE KEY" in key_file.read_text()
    assert record["hpc_user"] == "omeflow"
    assert record["hpc_host"] == "hpc.example.org"
    assert record["fingerprint"].startswith("SHA256:")
    assert record["revoked"] is None
    # The fingerprint matches ssh-keygen's view of the public key.
    assert record["fingerprint"] == keys.fingerprint(key_file.with_suffix(".pub").read_text())
    # No key material anywhere in the output, nor in the record.
    for secret in _private_keys(tmp_path):
        body = "".join(secret.splitlines()[1:-1])
        assert body[:40] not in out + err
        assert body[:40] not in (root / "alice.json").read_text()
    assert "PRIVATE" not in out + err


def test_create_twice_refused_names_rotate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _cli(tmp_path, *CREATE) == 0
    assert _cli(tmp_path, *CREATE) == 2
    assert "omeflow keys rotate --omero-user alice" in capsys.readouterr().err


def test_hostile_cli_input_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = list(CREATE)
    argv[argv.index("--from") + 1] = '10.0.0.5",command="/bin/sh'
    assert _cli(tmp_path, *argv) == 2
    assert "invalid --from entry" in capsys.readouterr().err
    assert not list((tmp_path / "keys").glob("*.json"))
    assert not list((tmp_path / "keys").rglob("id_ed25519*"))


def test_refuses_store_readable_by_others(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    with pytest.raises(KeyStoreError, match="chmod 700"):
        KeyStore(root).ensure()


def test_rotate_supersedes_and_prints_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _cli(tmp_path, *CREATE)
    first_line = capsys.readouterr().out.strip()
    store = KeyStore(tmp_path / "keys")
    old_file = store.active_key_file("alice")
    assert old_file is not None and old_file.exists()
    assert _cli(tmp_path, "rotate", "--omero-user", "alice") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# add")
    assert out[2].startswith("# remove")
    assert out[3] == first_line
    assert out[1] != first_line
    assert out[1].startswith(f'command="{GW} --config {CFG} --caller alice"')
    record = store.load("alice")
    assert [k["status"] for k in record["keys"]] == ["superseded", "active"]
    assert not old_file.exists()  # superseded private key is gone
    new_file = store.active_key_file("alice")
    assert new_file is not None and new_file != old_file and _mode(new_file) == 0o600


def test_revoke_then_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _cli(tmp_path, *CREATE)
    line = capsys.readouterr().out.strip()
    assert _cli(tmp_path, "revoke", "--omero-user", "alice") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["# remove this line from authorized_keys:", line]
    store = KeyStore(tmp_path / "keys")
    record = store.load("alice")
    assert record["revoked"] and record["status"] == "revoked"
    assert store.active_key_file("alice") is None
    assert _private_keys(tmp_path) == []
    assert _cli(tmp_path, "revoke", "--omero-user", "alice") == 2  # nothing left to revoke
    capsys.readouterr()
    assert _cli(tmp_path, "list") == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == [
        "OMERO_USER", "HPC_USER", "HOST", "FINGERPRINT", "CREATED", "EXPIRES", "STATUS",
    ]
    row = table.splitlines()[1].split()
    assert row[0] == "alice" and row[-1] == "revoked" and row[3] == record["fingerprint"]
    assert "AAAA" not in table and "PRIVATE" not in table


def test_rotate_unknown_user_names_create(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _cli(tmp_path, "rotate", "--omero-user", "bob") == 2
    assert "omeflow keys create" in capsys.readouterr().err


def test_expired_key_is_not_used(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    store.create("carol", "omeflow", "hpc", GW, CFG, None, 1)
    record = store.load("carol")
    record["keys"][-1]["expires"] = "2000-01-01"
    store.save(record)
    assert store.active_key_file("carol") is None
    assert keys.format_table(store.records()).splitlines()[1].split()[-1] == "expired"


def test_a_trailing_newline_never_reaches_authorized_keys() -> None:
    """``$`` in a ``match`` accepts "x\\n": every validator must refuse it (it would split
    the authorized_keys line)."""
    with pytest.raises(KeyStoreError):
        keys.validate_omero_user("alice\n")
    with pytest.raises(KeyStoreError):
        keys.validate_hpc_user("alice\n")
    with pytest.raises(KeyStoreError):
        keys.validate_host("hpc.example.org\n")
    with pytest.raises(KeyStoreError):
        authorized_keys_line(PUB, GW + "\n", CFG)
    with pytest.raises(KeyStoreError):
        authorized_keys_line(PUB, GW, CFG, comment="omeflow:alice\n")
    assert "\n" not in authorized_keys_line(PUB, GW, CFG, comment="omeflow:alice")


# -- callers, key folders, expiry ---------------------------------------------------------------
def test_line_names_the_caller_and_refuses_hostile_callers() -> None:
    line = authorized_keys_line(PUB, GW, CFG, "10.0.0.5", caller="alice.smith@lab")
    assert line.startswith(f'command="{GW} --config {CFG} --caller alice.smith@lab",restrict,')
    for bad in ('alice" ,permitopen="*', "alice --config /tmp/x", "-x", "ali\nce", "local", ""):
        with pytest.raises(KeyStoreError, match="OMERO user"):
            authorized_keys_line(PUB, GW, CFG, caller=bad)


def test_a_user_named_like_a_record_does_not_collide(tmp_path: Path) -> None:
    """User ``bob.json`` used to keep its keys in ``keys/bob.json/``: exactly the record file
    of user ``bob``, whose create then failed (and ``list`` tried to read a folder)."""
    store = KeyStore(tmp_path / "keys")
    store.create("bob.json", "omeflow", "hpc", GW, CFG, None, 30)
    store.create("bob", "omeflow", "hpc", GW, CFG, None, 30)
    assert {r["omero_user"] for r in store.records()} == {"bob", "bob.json"}
    assert store.active_key_file("bob") != store.active_key_file("bob.json")
    assert store.active_key_file("bob").exists() and store.active_key_file("bob.json").exists()


def test_key_expiring_today_is_not_used(tmp_path: Path) -> None:
    """sshd refuses a key from 00:00 of its expiry-time date: omeflow must not offer it that
    day (nor the evening before in UTC, when the HPC host's zone is already there)."""
    store = KeyStore(tmp_path / "keys")
    store.create("dave", "omeflow", "hpc", GW, CFG, None, 1)
    record = store.load("dave")
    today = dt.datetime.now(dt.UTC).date()
    record["keys"][-1]["expires"] = today.isoformat()
    store.save(record)
    assert store.active_key_file("dave") is None
    assert keys.format_table(store.records()).splitlines()[1].split()[-1] == "expired"
    evening = dt.datetime(2030, 1, 1, 23, 0, tzinfo=dt.UTC)
    assert keys.key_expired("2030-01-02", now=evening)  # already Jan 2 east of UTC+1
    assert not keys.key_expired("2030-01-03", now=evening)
    assert not keys.key_expired(None)
