"""Start the login-node container's sshd with the forced gateway command as the only key.

From the secrets compose mounts under /run/secrets: the host key (copied to /etc/ssh, root
only, as sshd requires) and Airflow's public key, written to ~omeflow/.ssh/authorized_keys as
``command="/usr/local/bin/omeflow-gateway --config /etc/omeflow/site.toml",restrict <key>``
by :func:`hpc_jobs.keys.authorized_keys_line` (which validates the key). Then sshd runs in the
foreground (PID 1's child replaced by sshd: ``docker stop`` reaches it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from pathlib import Path

from hpc_jobs.keys import authorized_keys_line

SECRETS = Path("/run/secrets")
GATEWAY = shutil.which("omeflow-gateway") or "/usr/local/bin/omeflow-gateway"
SITE = Path("/etc/omeflow/site.toml")
USER = "omeflow"


def main() -> None:
    host_key = Path("/etc/ssh/ssh_host_ed25519_key")
    shutil.copyfile(SECRETS / "ssh_host_ed25519_key", host_key)
    os.chmod(host_key, 0o600)
    if not SITE.is_file():
        sys.exit(f"{SITE} is missing: mount the site config there (docker/login-node/site.toml)")
    user = pwd.getpwnam(USER)
    ssh_dir = Path(user.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    line = authorized_keys_line((SECRETS / "omeflow_hpc_key.pub").read_text().strip(),
                                GATEWAY, SITE, comment="omeflow-airflow")
    keys = ssh_dir / "authorized_keys"
    keys.write_text(line + "\n")
    for path, mode in ((ssh_dir, 0o700), (keys, 0o600)):
        os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(path, mode)
    data = Path("/var/lib/omeflow")
    os.chown(data, user.pw_uid, user.pw_gid)  # the volume: jobs, data, store of the site
    print(f"authorized_keys: {line.split(' ssh-')[0]} ...", flush=True)
    os.execv("/usr/sbin/sshd", ["/usr/sbin/sshd", "-D", "-e"])  # noqa: S606 - fixed argv


if __name__ == "__main__":
    main()
