"""``docker/compose.yaml`` is a valid Compose file that deploys what the admin guide says.

No Docker engine runs here, so the file is checked the way ``docker compose config`` checks it:
variables interpolated (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``), then validated
against the Compose Specification's JSON schema (``docker/schema/compose-spec.json``, vendored
from github.com/compose-spec/compose-spec with its Apache-2.0 licence). Then what a deployment
needs: the four Airflow components on one PostgreSQL metadata database, the gateway connection
pinned to the login node's host key, every file, secret, build target and variable in place.
Where ``docker compose`` (or Debian's ``docker-compose``) is installed, it validates the file too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
SCHEMA = DOCKER / "schema" / "compose-spec.json"
COMPONENTS = {"api-server": "api-server", "scheduler": "scheduler",
              "dag-processor": "dag-processor", "triggerer": "triggerer"}
VAR_RE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation over every string of the parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        have = env.get(name)
        if op in (":?", "?") and not have:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and not have:
            return arg
        return have or ""

    return VAR_RE.sub(one, value)


def example_env() -> dict[str, str]:
    """docker/env.example with every empty value filled as an admin would."""
    env = {}
    for line in (DOCKER / "env.example").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            env[name] = value or f"test-{name.lower()}"
    env["OMEFLOW_HPC_HOST_KEY"] = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2d0b1fTestKeyOnly"
    return env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())
    return interpolate(raw, example_env())


def test_compose_file_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_schema_check_rejects_what_compose_rejects() -> None:
    """The check can fail: an unknown service key and a wrong type are reported."""
    bad = {"services": {"api-server": {"image": "x", "comand": ["api-server"], "ports": "8080"}}}
    errors = list(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(bad))
    text = " ".join(e.message for e in errors)
    assert "comand" in text and len(errors) >= 2, text


def test_a_missing_required_variable_stops_the_deployment() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    env = example_env()
    del env["OMEFLOW_JWT_SECRET"]
    with pytest.raises(MissingVariable, match="OMEFLOW_JWT_SECRET"):
        interpolate(raw, env)
    # and every variable the file requires is in env.example, so a copy of it is complete
    required = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE.read_text()))
    assert required <= set(example_env()), required - set(example_env())


def test_airflow_components_share_one_postgres_metadata_db(compose: dict[str, Any]) -> None:
    services = compose["services"]
    urls = set()
    for name, command in COMPONENTS.items():
        svc = services[name]
        assert svc["command"][0] == command
        env = svc["environment"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == \
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert "@postgres:5432/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        urls.add(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        # the secrets every component must share, or tasks fail with "Invalid auth token"
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == "test-omeflow_jwt_secret"
        assert env["AIRFLOW__API__SECRET_KEY"] == "test-omeflow_api_secret_key"
        assert env["AIRFLOW__OMEFLOW__HPC_TRANSPORT"] == "ssh"
        assert svc["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert len(urls) == 1
    assert "airflow db migrate" in " ".join(services["airflow-init"]["entrypoint"])
    assert services["postgres"]["image"].startswith("postgres:15")


def test_gateway_connection_is_pinned_and_uses_the_mounted_key(compose: dict[str, Any]) -> None:
    env = compose["services"]["scheduler"]["environment"]
    conn = json.loads(env["AIRFLOW_CONN_OMEFLOW_HPC"])
    assert conn["conn_type"] == "ssh" and conn["host"] == "login-node" and conn["port"] == 22
    assert conn["extra"]["host_key"] == example_env()["OMEFLOW_HPC_HOST_KEY"]
    mounted = {f"/run/secrets/{s['target']}" for s in compose["services"]["scheduler"]["secrets"]}
    assert conn["extra"]["key_file"] in mounted
    # the hook accepts it as it stands (a pinned key, nothing that weakens the check)
    from airflow.models.connection import Connection

    from hooks.hpc import check_ssh_extras

    check_ssh_extras("omeflow_hpc", Connection.from_json(env["AIRFLOW_CONN_OMEFLOW_HPC"],
                                                         conn_id="omeflow_hpc"))
    annotations = json.loads(env["AIRFLOW_CONN_OMEFLOW_ANNOTATIONS"])
    assert annotations["conn_type"] == "postgres" and annotations["host"] == "postgres"
    init_sql = (DOCKER / "postgres-init" / "10-annotations.sql").read_text()
    assert f"CREATE DATABASE {annotations['schema']}" in init_sql


def test_files_secrets_and_build_targets_exist(compose: dict[str, Any]) -> None:
    declared = set(compose["secrets"])
    for name, svc in compose["services"].items():
        for secret in svc.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in declared, f"{name} uses undeclared secret {source}"
        for dep in svc.get("depends_on", {}):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        build = svc.get("build")
        if build:
            dockerfile = (DOCKER / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile.is_file(), dockerfile
            if "target" in build:
                stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile.read_text(), re.M)
                assert build["target"] in stages, (build["target"], stages)
            copied = re.findall(r"^COPY (\S+) ", dockerfile.read_text(), re.M)
            for path in copied:
                assert (DOCKER / build["context"] / path).exists(), f"{dockerfile.name}: {path}"
    # the secret files themselves are made by the admin and never committed
    ignored = (DOCKER / ".gitignore").read_text().split()
    assert "secrets/" in ignored and ".env" in ignored


def test_login_node_site_config_is_valid() -> None:
    from hpc_jobs.config import SiteConfig

    site = SiteConfig.load(DOCKER / "login-node" / "site.toml")
    assert site.job_root == Path("/var/lib/omeflow/jobs")
    sshd = (DOCKER / "login-node" / "sshd_config").read_text()
    assert "PasswordAuthentication no" in sshd and "AllowUsers omeflow" in sshd
    assert tomllib.loads((DOCKER / "login-node" / "site.toml").read_text())["scheduler"] == "local"


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; the schema "
                    "check above validates the file (apt-get install docker-compose to run this)")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in example_env().items()))
    secrets = DOCKER / "secrets"
    made = not secrets.exists()
    if made:
        secrets.mkdir()
        for name in ("omeflow_hpc_key", "omeflow_hpc_key.pub", "login_node_host_key"):
            (secrets / name).write_text("placeholder\n")
    try:
        proc = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(env_file), "config",
                               "-q"], capture_output=True, text=True, timeout=60, check=False)
    finally:
        if made:
            shutil.rmtree(secrets)
    assert proc.returncode == 0, proc.stderr


def test_login_node_sshd_config_is_accepted_by_sshd(tmp_path: Path) -> None:
    sshd, keygen = Path("/usr/sbin/sshd"), shutil.which("ssh-keygen")
    if not sshd.exists() or keygen is None:
        pytest.skip("openssh-server is not installed (make test installs it for the sandbox)")
    key = tmp_path / "host_key"
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    proc = subprocess.run([str(sshd), "-t", "-f", str(DOCKER / "login-node" / "sshd_config"),
                           "-o", f"HostKey={key}"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
