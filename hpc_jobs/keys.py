"""``omeflow keys``: per-user gateway SSH keys (an OMERO user -> an HPC account).

Each OMERO user gets their own ed25519 key. Its public half goes into the HPC account's
``authorized_keys`` behind the forced command, so the key can do nothing but talk to the
gateway. The store is a directory (``$OMEFLOW_KEYS_DIR`` or ``~/.config/omeflow/keys``,
mode 0700) holding, per OMERO user, a JSON record and the private key file (mode 0600)::

    keys/
      alice.json                    # record: users, host, key history (fingerprints, dates)
      alice.keys/id_ed25519_<ts>    # private key of the active key (0600)
      alice.keys/id_ed25519_<ts>.pub

(Records end in ``.json``, key folders in ``.keys``: no user's folder can take the name of
another user's record, e.g. user ``bob.json``'s folder and user ``bob``'s record.)

The forced command names the key's OMERO user (``--caller alice``): the gateway records each
job with its caller and shows a caller only its own jobs, so several users' keys can share one
HPC account. Keys expire with sshd's ``expiry-time`` (a date means 00:00 of that day in the
HPC host's time zone); omeflow stops using a key once its expiry date has begun anywhere
(:func:`key_expired`), so it never offers a key sshd refuses.

Commands print authorized_keys lines (what the HPC admin must add or remove) and tables; a
private key is never printed or logged.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_jobs.fsutil import atomic_write
from hpc_jobs.protocol import validate_caller

# ---------------------------------------------------------------------------------------------
# Validation (always ``fullmatch``: with ``match``, ``$`` also accepts a trailing newline, which
# would split an authorized_keys line)
# ---------------------------------------------------------------------------------------------
_HPC_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_./+@-]*$")
_PUBKEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256) ([A-Za-z0-9+/]+={0,3})(?: (\S+))?$"
)
_COMMENT_RE = re.compile(r"^[A-Za-z0-9_.:@=+-]{1,128}$")


class KeyStoreError(ValueError):
    """A refused input or an inconsistent key store; the message names the fix."""


def validate_omero_user(name: str) -> str:
    """An OMERO user name, which becomes the key's gateway caller: letters, digits,
    ``_ . @ -``, at most 64 characters (:func:`hpc_jobs.protocol.validate_caller`)."""
    try:
        return validate_caller(name)
    except ValueError as exc:
        raise KeyStoreError(f"invalid OMERO user name: {exc}") from None


def validate_hpc_user(name: str) -> str:
    """A POSIX account name on the cluster (lower case, at most 32 characters)."""
    if not isinstance(name, str) or not _HPC_USER_RE.fullmatch(name):
        raise KeyStoreError(
            f"invalid HPC user name {name!r}: use a POSIX account name "
            "(lower-case letters, digits, _ and -, starting with a letter or _, at most 32)"
        )
    return name


def validate_host(host: str) -> str:
    """A DNS host name or an IP address (no user@, no port, no spaces)."""
    if not isinstance(host, str) or not host or len(host) > 253:
        raise KeyStoreError(
            f"invalid host {host!r}: give a DNS name or IP address, e.g. hpc.example.org"
        )
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise KeyStoreError(
            f"invalid host {host!r}: give a DNS name (letters, digits, '-' and dots) or an IP "
            "address, without user@ or :port"
        )
    return host


def validate_from(value: str | Sequence[str] | None) -> list[str]:
    """Parse a ``from=`` restriction: IP addresses or CIDR networks, comma separated."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in items:
        item = raw.strip() if isinstance(raw, str) else raw
        if not isinstance(item, str) or not item:
            raise KeyStoreError(
                f"invalid --from {value!r}: empty entry; give e.g. 10.0.0.5,10.1.0.0/16"
            )
        try:
            if "/" in item:
                out.append(str(ipaddress.ip_network(item, strict=True)))
            else:
                out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise KeyStoreError(
                f"invalid --from entry {item!r}: give IP addresses or CIDR networks "
                "(host bits zero), comma separated, e.g. 10.0.0.5,10.1.0.0/16"
            ) from None
    return out


def validate_abs_path(path: str | Path, what: str) -> str:
    """An absolute path free of quotes, spaces, commas and other shell/authorized_keys syntax."""
    text = str(path)
    if not _PATH_RE.fullmatch(text) or "/../" in text + "/" or "//" in text:
        raise KeyStoreError(
            f"invalid {what} {text!r}: give an absolute, normalised path using only "
            "A-Z a-z 0-9 _ . / + @ - (no spaces, quotes, commas or '..')"
        )
    return text


def validate_public_key(public_key: str) -> tuple[str, str, str | None]:
    """Split an OpenSSH public key line into (type, base64 blob, comment)."""
    m = _PUBKEY_RE.fullmatch((public_key or "").strip())
    if not m:
        raise KeyStoreError(
            "invalid public key: expected one OpenSSH line 'ssh-ed25519 AAAA... [comment]'"
        )
    try:
        base64.b64decode(m.group(2), validate=True)
    except ValueError:
        raise KeyStoreError("invalid public key: the base64 part does not decode") from None
    return m.group(1), m.group(2), m.group(3)


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------
def authorized_keys_line(
    public_key: str,
    gateway: str | Path,
    config: str | Path,
    from_: str | Sequence[str] | None = None,
    expiry: dt.date | None = None,
    comment: str | None = None,
    caller: str | None = None,
) -> str:
    """The ``authorized_keys`` line that binds ``public_key`` to the forced gateway command.

    ``command="<gateway> --config <config> [--caller <omero user>]",restrict[,from="<ips>"]
    [,expiry-time="YYYYMMDD"] <type> <base64> <comment>``. ``caller`` (the key's OMERO user)
    makes the gateway show this key only its own jobs; without it the key acts as the
    embedded default's caller. Every input is validated: nothing the caller passes can add
    options or break out of the quoted values.
    """
    ktype, blob, key_comment = validate_public_key(public_key)
    gw = validate_abs_path(gateway, "gateway path")
    cfg = validate_abs_path(config, "site config path")
    command = f"{gw} --config {cfg}"
    if caller is not None:
        command += f" --caller {validate_omero_user(caller)}"
    options = [f'command="{command}"', "restrict"]
    nets = validate_from(from_)
    if nets:
        options.append(f'from="{",".join(nets)}"')
    if expiry is not None:
        if not isinstance(expiry, dt.date):
            raise KeyStoreError("expiry must be a date")
        options.append(f'expiry-time="{expiry:%Y%m%d}"')
    line = f"{','.join(options)} {ktype} {blob}"
    final_comment = comment if comment is not None else key_comment
    if final_comment:
        if not _COMMENT_RE.fullmatch(final_comment):
            raise KeyStoreError(
                f"invalid key comment {final_comment!r}: use A-Z a-z 0-9 _ . : @ = + -"
            )
        line += f" {final_comment}"
    return line


def fingerprint(public_key: str) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a public key line."""
    _, blob, _ = validate_public_key(public_key)
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def generate_keypair(path: Path, comment: str) -> str:
    """Write a new ed25519 key pair at ``path`` (0600) and ``path.pub``; return the public line.

    Uses ``ssh-keygen`` (argv only) when present, else the ``cryptography`` package.
    """
    if not _COMMENT_RE.fullmatch(comment):
        raise KeyStoreError(f"invalid key comment {comment!r}")
    path = Path(path)
    if path.exists() or path.with_suffix(path.suffix + ".pub").exists():
        raise KeyStoreError(f"refusing to overwrite existing key file {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    keygen = shutil.which("ssh-keygen")
    old_umask = os.umask(0o077)
    try:
        if keygen:
            proc = subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
            if proc.returncode != 0:
                raise KeyStoreError(f"ssh-keygen failed: {proc.stderr.strip()}")
        else:  # pragma: no cover - exercised only where ssh-keygen is missing
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            key = Ed25519PrivateKey.generate()
            private = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            public = key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(private)
            path.with_suffix(path.suffix + ".pub").write_text(f"{public.decode()} {comment}\n")
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return path.with_suffix(path.suffix + ".pub").read_text().strip()


# ---------------------------------------------------------------------------------------------
# The key store
# ---------------------------------------------------------------------------------------------
def default_keys_dir() -> Path:
    """``$OMEFLOW_KEYS_DIR`` or ``~/.config/omeflow/keys``."""
    env = os.environ.get("OMEFLOW_KEYS_DIR")
    return Path(env) if env else Path.home() / ".config" / "omeflow" / "keys"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)  # noqa: UP017 (3.10)


#: The most any time zone is ahead of UTC (Kiribati, UTC+14).
_MAX_UTC_OFFSET = dt.timedelta(hours=14)


def key_expired(expires: str | None, now: dt.datetime | None = None) -> bool:
    """Whether sshd may already refuse a key with ``expiry-time`` = ``expires`` (ISO date).

    sshd reads a ``YYYYMMDD`` expiry as 00:00 of that day in the HPC host's time zone, which
    omeflow does not know: the key counts as expired from the moment its expiry date has begun
    anywhere (UTC+14), so a key is never offered on the day sshd refuses it.
    """
    if not expires:
        return False
    latest_local = ((now or _now()) + _MAX_UTC_OFFSET).date()
    return dt.date.fromisoformat(expires) <= latest_local


@dataclass
class KeyStore:
    """A directory of per-OMERO-user key records and private keys."""

    root: Path

    def ensure(self) -> Path:
        """Create the store (0700) or refuse one that others can read."""
        root = Path(self.root)
        if not root.exists():
            root.mkdir(parents=True, mode=0o700)
            os.chmod(root, 0o700)
        mode = root.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyStoreError(
                f"key store {root} has mode {mode:o}; others could read private keys. "
                f"Fix with: chmod 700 {root}"
            )
        return root

    def record_path(self, omero_user: str) -> Path:
        return Path(self.root) / f"{validate_omero_user(omero_user)}.json"

    def key_dir(self, omero_user: str) -> Path:
        """Folder of the user's private keys (``.keys``: never a record's name)."""
        return Path(self.root) / f"{validate_omero_user(omero_user)}.keys"

    def load(self, omero_user: str) -> dict[str, Any] | None:
        path = self.record_path(omero_user)
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def save(self, record: dict[str, Any]) -> None:
        path = self.record_path(record["omero_user"])
        atomic_write(path, json.dumps(record, indent=2, sort_keys=True) + "\n", mode=0o600)

    def records(self) -> list[dict[str, Any]]:
        root = Path(self.root)
        if not root.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(root.glob("*.json")) if p.is_file()]

    # -- operations -----------------------------------------------------------------------
    def _new_key(self, record: dict[str, Any], days: int | None) -> dict[str, Any]:
        created = _now()
        user = record["omero_user"]
        stamp = created.strftime("%Y%m%dT%H%M%S")
        folder = self.key_dir(user)
        key_path = folder / f"id_ed25519_{stamp}"
        n = 1
        while key_path.exists():
            key_path = folder / f"id_ed25519_{stamp}_{n}"
            n += 1
        key_path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(key_path.parent, 0o700)
        comment = f"omeflow:{user}@{created:%Y-%m-%d}"
        public = generate_keypair(key_path, comment)
        expires = (created + dt.timedelta(days=days)).date() if days else None
        line = authorized_keys_line(
            public, record["gateway"], record["config"], record["from"] or None, expires, comment,
            caller=user,
        )
        return {
            "fingerprint": fingerprint(public),
            "public_key": public,
            "key_file": str(key_path),
            "created": created.isoformat(),
            "expires": expires.isoformat() if expires else None,
            "status": "active",
            "revoked": None,
            "authorized_keys_line": line,
        }

    def create(
        self,
        omero_user: str,
        hpc_user: str,
        host: str,
        gateway: str,
        config: str,
        from_: str | Sequence[str] | None,
        days: int | None,
    ) -> dict[str, Any]:
        """Create the first key of ``omero_user``; returns the new key entry."""
        self.ensure()
        validate_omero_user(omero_user)
        existing = self.load(omero_user)
        if existing and _active(existing):
            raise KeyStoreError(
                f"OMERO user {omero_user!r} already has an active key; use "
                f"'omeflow keys rotate --omero-user {omero_user}' to replace it"
            )
        if days is not None and not 1 <= days <= 3650:
            raise KeyStoreError(f"invalid --days {days}: give 1..3650 (or omit for no expiry)")
        record = existing or {"omero_user": omero_user, "keys": []}
        record.update(
            {
                "hpc_user": validate_hpc_user(hpc_user),
                "hpc_host": validate_host(host),
                "gateway": validate_abs_path(gateway, "gateway path"),
                "config": validate_abs_path(config, "site config path"),
                "from": validate_from(from_),
                "days": days,
            }
        )
        entry = self._new_key(record, days)
        record["keys"].append(entry)
        _sync_summary(record)
        self.save(record)
        return entry

    def rotate(self, omero_user: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Replace the active key; returns (new entry, superseded entry).

        The superseded private key is deleted: omeflow uses the new key from now on. The HPC
        admin adds the new line and removes the old one.
        """
        self.ensure()
        record = self._require(omero_user)
        old = _active(record)
        if old is None:
            raise KeyStoreError(
                f"OMERO user {omero_user!r} has no active key; use 'omeflow keys create'"
            )
        entry = self._new_key(record, record.get("days"))
        old["status"] = "superseded"
        old["revoked"] = _now().isoformat()
        _remove_private(old)
        record["keys"].append(entry)
        _sync_summary(record)
        self.save(record)
        return entry, old

    def revoke(self, omero_user: str) -> dict[str, Any]:
        """Mark the active key revoked and delete its private key; returns the entry."""
        self.ensure()
        record = self._require(omero_user)
        old = _active(record)
        if old is None:
            raise KeyStoreError(f"OMERO user {omero_user!r} has no active key to revoke")
        old["status"] = "revoked"
        old["revoked"] = _now().isoformat()
        _remove_private(old)
        _sync_summary(record)
        self.save(record)
        return old

    def active_key_file(self, omero_user: str) -> Path | None:
        """Private key file of the user's active, unexpired key (for the orchestrator)."""
        record = self.load(omero_user)
        entry = _active(record) if record else None
        if entry is None:
            return None
        if key_expired(entry["expires"]):
            return None
        return Path(entry["key_file"])

    def _require(self, omero_user: str) -> dict[str, Any]:
        record = self.load(omero_user)
        if record is None:
            raise KeyStoreError(
                f"no key record for OMERO user {omero_user!r} in {self.root}; "
                "create one with 'omeflow keys create'"
            )
        return record


def _active(record: dict[str, Any]) -> dict[str, Any] | None:
    for entry in reversed(record.get("keys", [])):
        if entry["status"] == "active":
            return entry
    return None


def _sync_summary(record: dict[str, Any]) -> None:
    """Top-level fields describe the newest key (what ``list`` shows)."""
    latest = record["keys"][-1]
    record["fingerprint"] = latest["fingerprint"]
    record["created"] = latest["created"]
    record["expires"] = latest["expires"]
    record["revoked"] = latest["revoked"]
    record["status"] = latest["status"]


def _remove_private(entry: dict[str, Any]) -> None:
    path = Path(entry["key_file"])
    for p in (path, path.with_suffix(path.suffix + ".pub")):
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``omeflow keys`` arguments."""
    parser.add_argument(
        "--keys-dir", type=Path, default=None, help="key store (default $OMEFLOW_KEYS_DIR or "
        "~/.config/omeflow/keys)"
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="create a key; prints the authorized_keys line to add")
    c.add_argument("--omero-user", required=True)
    c.add_argument("--hpc-user", required=True)
    c.add_argument("--host", required=True, help="HPC login host")
    c.add_argument("--gateway", default="/opt/omeflow-hpc/venv/bin/omeflow-gateway")
    c.add_argument("--config", default="/etc/omeflow/site.toml", help="site config on the HPC")
    c.add_argument("--from", dest="from_", default=None, help="IPs/CIDRs allowed to use the key")
    c.add_argument("--days", type=int, default=90, help="validity in days (0 = no expiry)")
    r = sub.add_parser("rotate", help="replace a key; prints the line to add and the one to remove")
    r.add_argument("--omero-user", required=True)
    v = sub.add_parser("revoke", help="revoke a key; prints the line to remove")
    v.add_argument("--omero-user", required=True)
    sub.add_parser("list", help="table of keys (no key material)")


def main(args: argparse.Namespace) -> int:
    """Run ``omeflow keys ACTION``."""
    store = KeyStore(args.keys_dir or default_keys_dir())
    try:
        if args.keys_command == "create":
            entry = store.create(
                args.omero_user,
                args.hpc_user,
                args.host,
                args.gateway,
                args.config,
                args.from_,
                args.days or None,
            )
            print(entry["authorized_keys_line"])
            print(f"# private key: {entry['key_file']}", file=sys.stderr)
        elif args.keys_command == "rotate":
            new, old = store.rotate(args.omero_user)
            print("# add this line to authorized_keys:")
            print(new["authorized_keys_line"])
            print("# remove this (superseded) line:")
            print(old["authorized_keys_line"])
        elif args.keys_command == "revoke":
            old = store.revoke(args.omero_user)
            print("# remove this line from authorized_keys:")
            print(old["authorized_keys_line"])
        else:
            print(format_table(store.records()))
    except KeyStoreError as exc:
        print(f"omeflow keys: error: {exc}", file=sys.stderr)
        return 2
    return 0


def format_table(records: list[dict[str, Any]]) -> str:
    """A plain-text table of every key in every record (fingerprints, never key material)."""
    header = ("OMERO_USER", "HPC_USER", "HOST", "FINGERPRINT", "CREATED", "EXPIRES", "STATUS")
    rows = [header]
    for rec in records:
        for entry in rec.get("keys", []):
            status = entry["status"]
            expires = entry["expires"]
            if status == "active" and key_expired(expires):
                status = "expired"
            rows.append(
                (
                    rec["omero_user"],
                    rec.get("hpc_user", ""),
                    rec.get("hpc_host", ""),
                    entry["fingerprint"],
                    entry["created"][:10],
                    entry["expires"] or "never",
                    status,
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
