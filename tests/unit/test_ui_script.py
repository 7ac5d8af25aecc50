"""``scripts/ui.py`` (``make ui``) without starting Airflow: the shared secrets and its refusals.

Starting the components, a REST-triggered run and the clean stop are covered by
``tests/integration/test_rest_and_plugin.py``, which starts the UI through this same script.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import stat
import sys
from pathlib import Path
from types import ModuleType

import pytest

UI_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ui.py"


@pytest.fixture(scope="module")
def ui() -> ModuleType:
    spec = importlib.util.spec_from_file_location("omeflow_ui_script", UI_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_secrets_are_generated_once_private_and_shared(
    ui: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ui.SHARED_SECRETS.values():
        monkeypatch.delenv(name, raising=False)
    env = ui.component_env(tmp_path, "127.0.0.1", 8123)
    path = tmp_path / "var" / "ui_secrets.json"
    first = json.loads(path.read_text())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(first) == {"jwt_secret", "api_secret_key"}
    assert first["jwt_secret"] != first["api_secret_key"]
    assert ui.shared_secrets(tmp_path / "var") == first, "a restart must keep the secrets"
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == first["jwt_secret"]
    assert env["AIRFLOW__API__SECRET_KEY"] == first["api_secret_key"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:8123/execution/"


def test_a_readable_secrets_file_is_made_private(ui: ModuleType, tmp_path: Path) -> None:
    first = ui.shared_secrets(tmp_path)
    path = tmp_path / "ui_secrets.json"
    path.chmod(0o644)
    assert ui.shared_secrets(tmp_path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_broken_secrets_file_names_the_fix(ui: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "ui_secrets.json").write_text(json.dumps({"jwt_secret": "short"}))
    with pytest.raises(ui.UiError, match="delete it and start again"):
        ui.shared_secrets(tmp_path)


def test_a_busy_port_is_refused_before_anything_starts(
    ui: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert ui.main(["--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is in use" in err and "make ui UI_PORT=" in err, err
    assert not (tmp_path / "var" / "logs" / "ui").exists(), "no component was started"
