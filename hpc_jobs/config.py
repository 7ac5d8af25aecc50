"""Site configuration of the cluster side: where jobs live, which scheduler, which store.

Read from a TOML file whose path the HPC admin puts on the forced command's argv
(``omeflow-gateway --config /etc/omeflow/site.toml``); nothing is read at import time and
nothing the caller sends can choose the file. Relative paths are taken relative to the file.

Example::

    job_root = "/scratch/omeflow/jobs"
    data_root = "/scratch/omeflow/data"
    scheduler = "slurm"                 # or "local" (the embedded default)
    python = "/opt/omeflow/venv/bin/python"

    [store]
    kind = "omero"                      # or "local"
    host = "omero.example.org"
    port = 4064
    route = "direct"                    # or "reverse_tunnel" (compute nodes without network)

    [tunnel]                            # only for route = "reverse_tunnel" (hpc_jobs/tunnel.py)
    key = "/home/omeflow/.ssh/omeflow_tunnel"
    known_hosts = "/etc/omeflow/node_known_hosts"
    listen_port = 14064

    [slurm]
    partition = "cpu"
    account = "lab42"

    [models]
    cellpose = "/software/models/cellpose/nuclei"
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the OMERO lane (zeroc-ice 3.6.5 needs it)
    import tomli as tomllib

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hpc_jobs.protocol import (
    SAFE_NAME_RE,
    ErrorCode,
    GatewayError,
    Resources,
    SlurmName,
    array_indices,
)

#: File name of the default audit log in the job root (a leading dot: never a job key).
AUDIT_LOG_NAME = ".audit.log"


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreConfig(_Cfg):
    """Which image store jobs open."""

    kind: Literal["local", "omero"] = "local"
    #: LocalStore directory (kind = "local").
    path: Path | None = None
    #: OMERO server (kind = "omero"). Jobs join with their own session key.
    host: str | None = None
    port: int = 4064
    secure: bool = True
    #: PEM file of the CA that signed the OMERO server's certificate. Set it and jobs verify
    #: the server before sending their session key (docs/omero.md, "TLS").
    ca_file: Path | None = None
    #: How jobs reach OMERO: ``direct`` (compute nodes connect to host:port themselves) or
    #: ``reverse_tunnel`` (the login node opens an SSH reverse forward to the job's node and
    #: jobs connect to ``127.0.0.1:<tunnel.listen_port>``; see :mod:`hpc_jobs.tunnel`).
    route: Literal["direct", "reverse_tunnel"] = "direct"
    #: The name the server's certificate must carry when ``host`` is another address than
    #: the server's name. Set by the reverse tunnel (jobs connect to 127.0.0.1) to the
    #: configured host; a site file does not set it.
    tls_name: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> StoreConfig:
        if self.kind == "local" and self.path is None:
            raise ValueError('store.kind = "local" needs store.path (the LocalStore directory)')
        if self.kind == "omero" and not self.host:
            raise ValueError('store.kind = "omero" needs store.host')
        return self


#: A host name or address as ssh gets it (no leading '-': never read as an option).
HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}")
#: A POSIX user name.
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class TunnelConfig(_Cfg):
    """The reverse tunnel (``store.route = "reverse_tunnel"``): how the login node's keeper
    (:mod:`hpc_jobs.tunnel_keeper`) reaches a compute node and where jobs find the forward."""

    #: Private key the keeper logs in to compute nodes with (its public half is in the
    #: nodes' authorized_keys, restricted to this one forward: docs in hpc_jobs/tunnel.py).
    key: Path
    #: known_hosts file with the compute nodes' host keys (checked strictly).
    known_hosts: Path
    #: User on the compute nodes (default: the keeper's own user).
    node_user: str | None = Field(default=None, pattern=USER_RE.pattern)
    #: How the login node addresses a node: ``{node}`` is the node's name (``SLURMD_NODENAME``),
    #: e.g. ``"{node}-ib.cluster"``.
    node_address: str = "{node}"
    #: The nodes' sshd port.
    ssh_port: int = Field(default=22, ge=1, le=65535)
    #: The loopback port the forward listens on on each node; jobs connect to 127.0.0.1 there.
    listen_port: int = Field(default=14064, ge=1024, le=65535)
    #: How long a job waits for its node's forward before it gives up (exit 75: retried).
    open_timeout_s: float = Field(default=60, gt=0, le=3600)
    #: The keeper exits after this long with no job waiting, running or forwarded.
    idle_exit_s: float = Field(default=300, ge=0, le=86_400)
    #: Where the keeper's ssh control sockets live on the login node (local disk; default
    #: ``/tmp/omeflow-tunnel-<uid>``, created 0700 and checked to be the keeper's own).
    control_dir: Path | None = None

    @model_validator(mode="after")
    def _address(self) -> TunnelConfig:
        if HOST_RE.fullmatch(self.node_address.replace("{node}", "node")) is None:
            raise ValueError(
                f"tunnel.node_address {self.node_address!r} is not a host name template: use "
                'letters, digits, ".", "-" and "{node}" (e.g. "{node}-ib.cluster")'
            )
        return self

    def address_of(self, node: str) -> str:
        """The ssh destination of ``node`` (validated: never an ssh option)."""
        if HOST_RE.fullmatch(node) is None:
            raise ValueError(f"node name {node!r} is not a host name")
        return self.node_address.replace("{node}", node)


class SlurmConfig(_Cfg):
    """Site defaults passed to sbatch (as separate argv elements)."""

    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    gpu_partition: SlurmName | None = None
    #: Upper bounds a caller's resource overrides may not exceed.
    max_cpus: int = 128
    max_mem_mb: int = 1_000_000
    max_time_min: int = 7 * 24 * 60
    max_gpus: int = 8
    max_array_tasks: int = 1000
    #: The cluster's ``slurm.conf`` when Slurm's tools do not find it by themselves: passed to
    #: them as ``SLURM_CONF`` (they get no other variable from the gateway's environment).
    conf: Path | None = None

    def _limited(self, res: Resources) -> list[tuple[str, int, int]]:
        return [
            ("cpus", res.cpus, self.max_cpus),
            ("mem_mb", res.mem_mb, self.max_mem_mb),
            ("time_min", res.time_min, self.max_time_min),
            ("gpus", res.gpus, self.max_gpus),
        ]

    def clamp(self, res: Resources) -> Resources:
        """``res`` scaled down to this site's limits (for a step's default resources)."""
        return res.model_copy(update={k: min(v, lim) for k, v, lim in self._limited(res)})

    def over_limits(self, res: Resources) -> list[str]:
        """What in ``res`` exceeds this site's limits, e.g. ``["cpus=4 > max_cpus=2"]``."""
        over = [f"{k}={v} > max_{k}={lim}" for k, v, lim in self._limited(res) if v > lim]
        if res.array and len(array_indices(res.array)) > self.max_array_tasks:
            over.append(f"array={res.array} > max_array_tasks={self.max_array_tasks}")
        return over


class ModelsConfig(_Cfg):
    """Where the site keeps model weights."""

    #: A Cellpose model file or a directory of models (CELLPOSE_LOCAL_MODELS_PATH-style).
    cellpose: Path | None = None
    #: Folder of trained cell classifiers (``<name>.pt`` + ``<name>.json``); default
    #: ``<data_root>/models/classifier``.
    classifier: Path | None = None

    def classifier_dir(self, data_root: Path) -> Path:
        """Where ``train_classifier`` writes and ``predict`` reads classifier files."""
        if self.classifier:
            return Path(self.classifier)
        return Path(data_root) / "models" / "classifier"


class SiteConfig(_Cfg):
    """The whole cluster-side configuration."""

    job_root: Path
    data_root: Path
    scheduler: Literal["local", "slurm"] = "local"
    #: Interpreter that runs jobs (defaults to the gateway's own).
    python: Path = Field(default_factory=lambda: Path(sys.executable))
    audit_log: Path | None = None
    store: StoreConfig
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    tunnel: TunnelConfig | None = None

    @classmethod
    def local(cls, root: Path) -> SiteConfig:
        """The embedded default under ``root``: jobs/, data/ and store/ folders, the local
        scheduler and store, jobs run by this Python."""
        return cls(
            job_root=root / "jobs",
            data_root=root / "data",
            scheduler="local",
            python=Path(sys.executable),
            store=StoreConfig(kind="local", path=root / "store"),
        )

    @model_validator(mode="after")
    def _route_complete(self) -> SiteConfig:
        if self.store.route != "reverse_tunnel":
            return self
        if self.store.kind != "omero":
            raise ValueError(
                'store.route = "reverse_tunnel" is for store.kind = "omero" (the local store '
                'opens no connection); use route = "direct"'
            )
        if self.scheduler != "slurm":
            raise ValueError(
                'store.route = "reverse_tunnel" needs scheduler = "slurm" (local jobs run on '
                'the login node itself: use route = "direct")'
            )
        if self.tunnel is None:
            raise ValueError(
                'store.route = "reverse_tunnel" needs a [tunnel] table with at least key and '
                "known_hosts (see hpc_jobs/tunnel.py)"
            )
        if not self.store.secure:
            raise ValueError(
                'store.route = "reverse_tunnel" needs store.secure = true: only the TLS port '
                "is forwarded, and an insecure data connection goes to the server's own "
                "address, which compute nodes cannot reach"
            )
        return self

    @model_validator(mode="after")
    def _audit_outside_job_keys(self) -> SiteConfig:
        problem = self.audit_conflict()
        if problem:
            raise ValueError(problem)
        return self

    def audit_conflict(self) -> str | None:
        """Why ``audit_log`` is unsafe, or None. A job key names ``<job_root>/<key>``: an audit
        log there could be taken (or shadowed) by a job. Dot names are outside that namespace."""
        if self.audit_log is None:
            return None
        try:
            first = Path(self.audit_log).relative_to(self.job_root).parts[0]
        except (ValueError, IndexError):
            return None
        if SAFE_NAME_RE.fullmatch(first) is None:
            return None
        return (
            f"audit_log {self.audit_log} lies in the job-key namespace of job_root (a job "
            f"key {first!r} would take its place); put it outside job_root, or under a name "
            f"starting with a dot (e.g. {Path(self.job_root) / AUDIT_LOG_NAME})"
        )

    @property
    def audit_path(self) -> Path:
        """The audit log: ``audit_log``, else ``<job_root>/.audit.log`` (a dot name: no job
        key can be equal to it)."""
        return self.audit_log or self.job_root / AUDIT_LOG_NAME

    @classmethod
    def load(cls, path: str | Path) -> SiteConfig:
        """Read and validate a site file; errors are :class:`GatewayError` (CONFIG_ERROR)."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise GatewayError(
                ErrorCode.CONFIG_ERROR,
                f"site configuration {path} does not exist; the HPC admin must create it "
                "(see hpc_jobs/config.py for an example)",
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise GatewayError(
                ErrorCode.CONFIG_ERROR, f"site configuration {path} is unreadable: {exc}"
            ) from None
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            raise GatewayError(
                ErrorCode.CONFIG_ERROR,
                f"site configuration {path} is invalid: "
                + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
            ) from None
        cfg = cfg.resolved(path.parent)
        problem = cfg.audit_conflict()
        if problem:
            raise GatewayError(
                ErrorCode.CONFIG_ERROR, f"site configuration {path} is invalid: {problem}"
            )
        return cfg

    def resolved(self, base: Path) -> SiteConfig:
        """Return a copy whose relative paths are anchored at ``base``."""

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = Path(p).expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        store = self.store.model_copy(
            update={"path": fix(self.store.path), "ca_file": fix(self.store.ca_file)}
        )
        models = self.models.model_copy(update={"cellpose": fix(self.models.cellpose),
                                                 "classifier": fix(self.models.classifier)})
        slurm = self.slurm.model_copy(update={"conf": fix(self.slurm.conf)})
        tunnel = self.tunnel and self.tunnel.model_copy(
            update={k: fix(getattr(self.tunnel, k)) for k in ("key", "known_hosts", "control_dir")}
        )
        return self.model_copy(
            update={
                "job_root": fix(self.job_root),
                "data_root": fix(self.data_root),
                "python": fix(self.python),
                "audit_log": fix(self.audit_log),
                "store": store,
                "slurm": slurm,
                "models": models,
                "tunnel": tunnel,
            }
        )

    def to_toml(self) -> str:
        """Serialise (for the sandbox and the embedded default, which write their own file)."""
        lines = [
            f'job_root = "{self.job_root}"',
            f'data_root = "{self.data_root}"',
            f'scheduler = "{self.scheduler}"',
            f'python = "{self.python}"',
        ]
        if self.audit_log:
            lines.append(f'audit_log = "{self.audit_log}"')
        lines += ["", "[store]", f'kind = "{self.store.kind}"']
        if self.store.path:
            lines.append(f'path = "{self.store.path}"')
        if self.store.host:
            lines += [f'host = "{self.store.host}"', f"port = {self.store.port}"]
        if self.store.route != "direct":
            lines.append(f'route = "{self.store.route}"')
        lines += ["", "[slurm]"]
        for key, value in self.slurm.model_dump(exclude_none=True).items():
            lines.append(f"{key} = {value}" if isinstance(value, int) else f'{key} = "{value}"')
        models = self.models.model_dump(exclude_none=True)
        if models:
            lines += ["", "[models]", *(f'{k} = "{v}"' for k, v in models.items())]
        if self.tunnel is not None:
            lines += ["", "[tunnel]"]
            for key, value in self.tunnel.model_dump(exclude_none=True).items():
                text = f'"{value}"' if isinstance(value, (str, Path)) else str(value)
                lines.append(f"{key} = {text}")
        return "\n".join(lines) + "\n"
