"""Through the real sshd: the key can run the gateway's verbs and nothing else.

``authorized_keys`` carries ``command="omeflow-gateway --config … --caller airflow",restrict,
from="127.0.0.1"``:
any command line, subsystem (sftp/scp), PTY, port forwarding or agent forwarding must fail.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import paramiko
import pytest

from hpc_jobs.config import SiteConfig

pytestmark = pytest.mark.sandbox
CANARY = Path("/tmp/omeflow-canary/forced-command")


@pytest.fixture()
def client(sandbox: dict[str, Any]) -> paramiko.SSHClient:
    cli = paramiko.SSHClient()
    cli.get_host_keys().add(
        f"[{sandbox['host']}]:{sandbox['port']}",
        sandbox["host_key_type"],
        paramiko.PKey.from_type_string(
            sandbox["host_key_type"], __import__("base64").b64decode(sandbox["host_key"])
        ),
    )
    cli.set_missing_host_key_policy(paramiko.RejectPolicy())
    cli.connect(
        sandbox["host"],
        port=sandbox["port"],
        username=sandbox["user"],
        key_filename=sandbox["key_file"],
        allow_agent=False,
        look_for_keys=False,
        timeout=20,
    )
    yield cli
    cli.close()


def ssh_argv(sandbox: dict[str, Any], tmp_path: Path, *options: str) -> list[str]:
    """OpenSSH client argv for the sandbox with its host key pinned; ``options`` go before
    the destination, the remote command (if any) after it."""
    known = tmp_path / "known_hosts"
    known.write_text(
        f"[{sandbox['host']}]:{sandbox['port']} {sandbox['host_key_type']} {sandbox['host_key']}\n"
    )
    return [
        "ssh", "-i", sandbox["key_file"], "-p", str(sandbox["port"]),
        "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}",
        "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
        *options, f"{sandbox['user']}@{sandbox['host']}",
    ]


def run(cli: paramiko.SSHClient, command: str, body: bytes = b"{}") -> tuple[int, dict | None]:
    chan = cli.get_transport().open_session(timeout=20)
    chan.settimeout(60)
    chan.exec_command(command)
    chan.sendall(body)
    chan.shutdown_write()
    out = b""
    while chunk := chan.recv(65536):
        out += chunk
    code = chan.recv_exit_status()
    try:
        return code, json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return code, None


def test_only_the_verbs_work(client: paramiko.SSHClient) -> None:
    code, reply = run(client, "ping")
    assert code == 0 and reply["ok"] is True and reply["scheduler"] == "slurm"


def test_the_key_acts_as_the_caller_its_line_names(
    client: paramiko.SSHClient, sandbox: dict[str, Any]
) -> None:
    """The sandbox key's forced command carries ``--caller``: its jobs are recorded with that
    caller, and the audit log names it for every call."""
    line = (Path(f"~{sandbox['user']}").expanduser() / ".ssh" / "authorized_keys").read_text()
    assert f"--caller {sandbox['caller']}\"" in line
    key = f"caller-check-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"step": "cluster_check", "job_key": key}).encode()
    code, reply = run(client, "submit", body)
    assert code == 0 and reply["ok"], reply
    try:
        record = json.loads((Path(sandbox["job_root"]) / key / "job.json").read_text())
        assert record["caller"] == sandbox["caller"]
        site = SiteConfig.load(sandbox["site_config"])
        audit = [json.loads(x) for x in site.audit_path.read_text().splitlines()]
        mine = [e for e in audit if e.get("job_key") == key]
        assert mine and all(e["caller"] == sandbox["caller"] for e in mine)
    finally:
        run(client, "cancel", json.dumps({"job_id": key}).encode())


@pytest.mark.parametrize(
    "command",
    [
        "ls",
        "ls -la ~",
        "id",
        f"bash -c 'touch {CANARY}'",
        f"sh -c 'touch {CANARY}'",
        f"touch {CANARY}",
        f"ping; touch {CANARY}",
        "cat ~/.ssh/authorized_keys",
        "python3 -c 'import os'",
        "scp -t /tmp",
        "rsync --server . /tmp",
        "",
    ],
)
def test_any_other_command_gets_the_gateway_refusal(
    client: paramiko.SSHClient, command: str
) -> None:
    code, reply = run(client, command)
    assert code != 0
    assert reply is not None and reply["error"]["code"] == "BAD_VERB", reply
    assert not CANARY.exists()


def test_sftp_subsystem_is_refused(client: paramiko.SSHClient) -> None:
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        sftp = client.open_sftp()  # the forced command answers instead of an SFTP server
        sftp.listdir(".")


def test_pty_is_refused(client: paramiko.SSHClient) -> None:
    chan = client.get_transport().open_session(timeout=20)
    with pytest.raises(paramiko.SSHException):
        chan.get_pty()


def test_local_port_forwarding_is_refused(client: paramiko.SSHClient) -> None:
    with pytest.raises(paramiko.ChannelException):
        client.get_transport().open_channel(
            "direct-tcpip", ("127.0.0.1", 2222), ("127.0.0.1", 0), timeout=20
        )


def test_remote_port_forwarding_is_refused(client: paramiko.SSHClient) -> None:
    with pytest.raises(paramiko.SSHException):
        client.get_transport().request_port_forward("127.0.0.1", 0)


def test_openssh_client_sees_the_same(sandbox: dict[str, Any], tmp_path: Path) -> None:
    base = ssh_argv(sandbox, tmp_path)
    ok = subprocess.run([*base, "ping"], input=b"{}", capture_output=True, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    bad = subprocess.run([*base, "ls", "/"], input=b"", capture_output=True, timeout=60)
    assert bad.returncode != 0 and b"BAD_VERB" in bad.stdout and b"bin" not in bad.stdout
    # a remote forward is refused by the server at once
    fwd = subprocess.run(
        ssh_argv(sandbox, tmp_path, "-o", "ExitOnForwardFailure=yes", "-N",
                 "-R", "127.0.0.1:0:127.0.0.1:22"),
        capture_output=True,
        timeout=60,
    )
    assert fwd.returncode != 0 and b"forwarding failed" in fwd.stderr.lower()


def test_local_forward_through_openssh_gets_nothing(
    sandbox: dict[str, Any], tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ssh_argv(sandbox, tmp_path, "-N", "-L", f"127.0.0.1:{port}:127.0.0.1:{sandbox['port']}"),
        stderr=subprocess.PIPE,
    )
    timer = threading.Timer(60, proc.kill)  # never outlive the test
    timer.start()
    try:
        data = b""
        for _ in range(50):  # wait for the listener
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    conn.settimeout(5)
                    try:
                        data = conn.recv(100)
                    except (TimeoutError, ConnectionResetError):
                        data = b""
                break
            except ConnectionRefusedError:
                threading.Event().wait(0.2)
        assert not data.startswith(b"SSH-"), "the forwarded port reached sshd"
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        timer.cancel()
    assert b"prohibited" in err.lower() or b"open failed" in err.lower(), err
