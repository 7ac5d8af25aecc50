"""Hostile input battery against the real ``omeflow-gateway`` process.

Every case tries to run ``touch <canary>`` (shell metacharacters, command substitution, path
tricks, unicode look-alikes, type confusion, oversized and malformed bodies). Each must get a
JSON error and a non-zero exit, and afterwards no canary may exist and nothing may have been
written outside the job root's bookkeeping. The forced command's ``--caller`` gets the same
treatment, and one caller's jobs must look, to any other caller, like jobs that do not exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_jobs.config import SiteConfig

GATEWAY = [sys.executable, "-m", "hpc_jobs.gateway"]
CANARY_DIR = Path("/tmp/omeflow-canary")


def canary(tag: str) -> str:
    return str(CANARY_DIR / f"pwned-{tag}")


def _call(
    config: Path,
    verb: str | None,
    body: bytes,
    env_extra: dict | None = None,
    caller: str | None = None,
):
    env = {k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"}
    if verb is not None:
        env["SSH_ORIGINAL_COMMAND"] = verb
    env.update(env_extra or {})
    proc = subprocess.run(
        GATEWAY + ["--config", str(config)] + ([] if caller is None else ["--caller", caller]),
        input=body,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return proc


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gw")
    cfg = SiteConfig.local(root)
    path = root / "site.toml"
    path.write_text(cfg.to_toml())
    CANARY_DIR.mkdir(exist_ok=True)
    for old in CANARY_DIR.glob("pwned-*"):
        old.unlink()
    return path


def sub(**fields) -> bytes:
    req = {"step": "cluster_check", "job_key": "ok-key", "params": {}}
    req.update(fields)
    return json.dumps(req).encode()


C = canary("x")
HOSTILE_VERBS = [
    None,
    "",
    "ls",
    "id",
    f"touch {C}",
    f"ping; touch {C}",
    f"ping && touch {C}",
    f"ping | touch {C}",
    f"$(touch {C})",
    f"`touch {C}`",
    f"ping\ntouch {C}",
    " ping",
    "ping ",
    "PING",
    "submit status",
    "../ping",
    "/bin/sh",
    f"bash -c 'touch {C}'",
    "ping\x00",
    "p\u0131ng",  # dotless i
    "\uff50\uff49\uff4e\uff47",  # fullwidth "ping"
    "scp -t /tmp",
    "rsync --server -e.LsfxC . /tmp",
    "internal-sftp",
    "sftp-server",
    "ping\r",
    "ping\t",
    "ping --help",
]

HOSTILE_SUBMITS: list[tuple[str, bytes]] = [
    ("key-semicolon", sub(job_key=f"a; touch {C}")),
    ("key-subst", sub(job_key=f"$(touch {C})")),
    ("key-backtick", sub(job_key=f"`touch {C}`")),
    ("key-traversal", sub(job_key="../../etc/cron.d/x")),
    ("key-dotdot", sub(job_key="..")),
    ("key-dot", sub(job_key=".")),
    ("key-hidden", sub(job_key=".ssh")),
    ("key-dash", sub(job_key="-rf")),
    ("key-slash", sub(job_key="a/b")),
    ("key-nul", sub(job_key="a\x00b")),
    ("key-newline", sub(job_key="a\nb")),
    ("key-space", sub(job_key="a b")),
    ("key-fullwidth", sub(job_key="\uff41bc")),
    ("key-rtl", sub(job_key="abc\u202egpj")),
    ("key-long", sub(job_key="a" * 500)),
    ("key-int", sub(job_key=5)),
    ("key-list", sub(job_key=["a"])),
    ("key-null", sub(job_key=None)),
    ("step-semicolon", sub(step=f"cluster_check; touch {C}")),
    ("step-path", sub(step="../../bin/sh")),
    ("step-upper", sub(step="CLUSTER_CHECK")),
    ("step-newline", sub(step="cluster_check\n")),
    ("step-unknown", sub(step="shell")),
    ("step-module", sub(step="os.system")),
    ("params-subst", sub(params={"sleep_s": f"$(touch {C})"})),
    ("params-str-int", sub(params={"sleep_s": "5"})),
    ("params-float", sub(params={"sleep_s": 1.5})),
    ("params-bool", sub(params={"exit_code": True})),
    ("params-range", sub(params={"exit_code": 999})),
    ("params-negative", sub(params={"sleep_s": -1})),
    ("params-unknown", sub(params={"command": f"touch {C}"})),
    ("params-list", sub(params=[f"touch {C}"])),
    ("params-huge-number", b'{"step":"cluster_check","job_key":"k","params":{"sleep_s":1e999}}'),
    ("res-cpus", sub(resources={"cpus": 100000})),
    ("res-partition", sub(resources={"partition": f"debug --wrap='touch {C}'"})),
    ("res-array", sub(resources={"array": f"0-3;touch {C}"})),
    ("res-mem", sub(resources={"mem_mb": -1})),
    ("res-gpus-str", sub(resources={"gpus": "1"})),
    ("res-unknown", sub(resources={"extra_sbatch": f"--wrap=touch {C}"})),
    ("secret-bad", sub(secrets={"omero_session_key": f"abc; touch {C}"})),
    ("secret-unknown", sub(secrets={"password": "hunter2"})),
    ("top-unknown", sub(shell=f"touch {C}")),
    ("body-text", f"touch {C}".encode()),
    ("body-array", b"[1, 2, 3]"),
    ("body-string", b'"ping"'),
    ("body-invalid-utf8", b'{"step": "\xff\xfe"}'),
    ("body-nul", b'{"step": "cluster_check\x00"}'),
    ("body-duplicate-keys", b'{"step":"cluster_check","job_key":"a","job_key":"../b"}'),
    ("body-nan", b'{"step":"cluster_check","job_key":"k","params":{"sleep_s":NaN}}'),
    ("body-deep", b"[" * 100_000 + b"]" * 100_000),
    (
        "body-oversized",
        b'{"step":"cluster_check","job_key":"k","params":{"x":"' + b"A" * 300_000 + b'"}}',
    ),
]


def _train(labels: list, **params) -> bytes:
    """A train_classifier submit; ``snapshot_hash`` defaults to the labels' true hash when it
    can be computed (so each case tests exactly one thing)."""
    from hpc_jobs.classifier.snapshot import snapshot_hash

    try:
        digest = snapshot_hash(labels)
    except (TypeError, ValueError):
        digest = "0" * 64
    return sub(step="train_classifier",
               params={"labels": labels, "snapshot_hash": digest, **params})


GOOD_LABELS = [[3, 10, 1], [3, 11, 0], [4, 12, 1], [4, 13, 0]]
# The label snapshot travels in the submit body: bounded, typed, hashed, and no field that
# names a file can leave the site's model folder. (Positions are never sent: the job reads
# them from the image's nuclei table; an unknown image or nucleus fails the job with its
# name, see tests/science/test_train_classifier.py.)
HOSTILE_SUBMITS += [
    ("train-too-many", _train([[1, i, i % 2] for i in range(1, 8002)])),
    ("train-body-oversized", _train([[2**31, 2**31 + i, i % 2] for i in range(12000)])),
    ("train-label-str", _train([*GOOD_LABELS, [5, 1, "1"]])),
    ("train-label-bool", _train([*GOOD_LABELS, [5, 1, True]])),
    ("train-label-unsure", _train([*GOOD_LABELS, [5, 1, 2]])),
    ("train-id-float", _train([*GOOD_LABELS, [5.5, 1, 1]])),
    ("train-id-negative", _train([*GOOD_LABELS, [-5, 1, 1]])),
    ("train-id-str", _train([*GOOD_LABELS, ["5; rm -rf /", 1, 1]])),
    ("train-entry-long", _train([*GOOD_LABELS, [5, 1, 1, 9]])),
    ("train-entry-dict", _train([*GOOD_LABELS, {"image": 5, "x": 10, "y": 20}])),
    ("train-with-positions", _train(GOOD_LABELS, positions=[[0, 0]])),
    ("train-duplicate", _train([*GOOD_LABELS, [3, 10, 0]])),
    ("train-one-class", _train([[3, 10, 1], [3, 11, 1]])),
    ("train-bad-hash", sub(step="train_classifier", params={
        "labels": GOOD_LABELS, "snapshot_hash": "f" * 64})),
    ("train-hash-path", sub(step="train_classifier", params={
        "labels": GOOD_LABELS, "snapshot_hash": "../../etc/passwd"})),
    ("train-name-traversal", _train(GOOD_LABELS, name="../../../etc/cron.d/x")),
    ("train-name-absolute", _train(GOOD_LABELS, name="/etc/passwd")),
    ("train-compare-path", _train(GOOD_LABELS, compare_with="../other-site/model")),
    ("train-pretrained-path", _train(GOOD_LABELS, pretrained="/home/user/evil.pt")),
    ("train-device-subst", _train(GOOD_LABELS, device=f"cuda; touch {C}")),
]

HOSTILE_OTHER: list[tuple[str, str, bytes]] = [
    ("status-traversal", "status", b'{"job_ids": ["../../etc"]}'),
    ("status-empty", "status", b'{"job_ids": []}'),
    ("status-too-many", "status", json.dumps({"job_ids": [f"j{i}" for i in range(3000)]}).encode()),
    ("status-subst", "status", json.dumps({"job_ids": [f"$(touch {C})"]}).encode()),
    ("cancel-glob", "cancel", b'{"job_id": "*"}'),
    ("cancel-percent", "cancel", b'{"job_id": "%"}'),
    ("cancel-missing", "cancel", b'{"job_id": "no-such-job"}'),
    ("log-traversal", "log", b'{"job_id": "../../etc/passwd"}'),
    ("log-huge", "log", b'{"job_id": "ok-key", "max_bytes": 1000000000}'),
    ("log-offset-str", "log", b'{"job_id": "ok-key", "offset": "0"}'),
    ("result-traversal", "result", b'{"job_id": "ok-key", "name": "../job.json"}'),
    ("result-absolute", "result", b'{"job_id": "ok-key", "name": "/etc/passwd"}'),
    ("result-nested", "result", b'{"job_id": "ok-key", "name": "a/../../request.json"}'),
    ("result-secrets", "result", b'{"job_id": "ok-key", "name": "secrets.json"}'),
    ("result-link", "result", b'{"job_id": "ok-key", "name": "link.json"}'),
    # the queue verb takes no fields at all
    ("queue-extra-field", "queue", json.dumps({"user": f"$(touch {C})"}).encode()),
    ("queue-job-ids", "queue", b'{"job_ids": ["ok-key"]}'),
    ("queue-array-body", "queue", b'["ok-key"]'),
    ("queue-string-body", "queue", json.dumps(f"; touch {C}").encode()),
]

#: ``cancel``'s ``by`` (the person who cancelled, from the UI): each must be refused before the
#: gateway acts (the job keeps running, nothing is recorded).
HOSTILE_BY: list[tuple[str, Any]] = [
    ("by-subst", f"$(touch {C})"),
    ("by-backticks", f"`touch {C}`"),
    ("by-semicolon", f"jane; touch {C}"),
    ("by-newline", "jane\nINFO cancelled by admin"),
    ("by-space", "jane doe"),
    ("by-slash", "../../etc/passwd"),
    ("by-leading-dash", "-rf"),
    ("by-leading-dot", ".hidden"),
    ("by-empty", ""),
    ("by-too-long", "a" * 65),
    ("by-fullwidth", "\uff4a\uff41\uff4e\uff45"),
    ("by-rtl-override", "jane\u202egnp.exe"),
    ("by-nul", "jane\u0000root"),
    ("by-int", 7),
    ("by-list", ["jane"]),
    ("by-object", {"name": "jane"}),
    ("by-bool", True),
]


@pytest.fixture(scope="module")
def ok_job(site: Path) -> Path:
    """One legitimate job (so hostile log/result requests have a real target)."""
    proc = _call(site, "submit", sub(secrets={"omero_session_key": "0123456789abcdef-sess"}))
    assert proc.returncode == 0, proc.stdout
    job_dir = site.parent / "jobs" / "ok-key"
    (job_dir / "outputs" / "link.json").symlink_to("/etc/passwd")
    return job_dir


def test_battery_has_at_least_60_cases() -> None:
    assert len(HOSTILE_VERBS) + len(HOSTILE_SUBMITS) + len(HOSTILE_OTHER) + len(HOSTILE_BY) >= 80
    assert len(HOSTILE_CALLERS) >= 20


def _assert_refused(proc: subprocess.CompletedProcess, what: str) -> dict:
    assert proc.returncode != 0, f"{what}: accepted ({proc.stdout[:300]!r})"
    lines = proc.stdout.decode().strip().splitlines()
    assert len(lines) == 1, f"{what}: reply must be one JSON line, got {proc.stdout[:300]!r}"
    reply = json.loads(lines[0])
    assert reply["ok"] is False and reply["error"]["code"], what
    assert "Traceback" not in proc.stdout.decode(), what
    return reply


@pytest.mark.parametrize("verb", HOSTILE_VERBS, ids=[repr(v)[:30] for v in HOSTILE_VERBS])
def test_hostile_verbs_are_refused(site: Path, verb: str | None) -> None:
    if verb is not None and "\x00" in verb:
        pytest.skip("an environment variable cannot hold NUL; sshd cannot send it either")
    reply = _assert_refused(_call(site, verb, b"{}"), repr(verb))
    assert reply["error"]["code"] == "BAD_VERB"


@pytest.mark.parametrize(("name", "body"), HOSTILE_SUBMITS, ids=[n for n, _ in HOSTILE_SUBMITS])
def test_hostile_submits_are_refused(site: Path, ok_job: Path, name: str, body: bytes) -> None:
    before = sorted(p.name for p in (site.parent / "jobs").iterdir())
    reply = _assert_refused(_call(site, "submit", body), name)
    assert reply["error"]["code"] in {
        "BAD_REQUEST",
        "BAD_JSON",
        "BAD_PARAMS",
        "UNKNOWN_STEP",
        "BODY_TOO_LARGE",
        "CONFLICT",
    }
    after = sorted(p.name for p in (site.parent / "jobs").iterdir())
    assert after == before, f"{name}: a refused submit created {set(after) - set(before)}"


TRAIN_CASES = [(n, b) for n, b in HOSTILE_SUBMITS if n.startswith("train-")]


@pytest.mark.parametrize(("name", "body"), TRAIN_CASES, ids=[n for n, _ in TRAIN_CASES])
def test_hostile_label_snapshots_are_refused_by_the_step_model(
        site: Path, name: str, body: bytes) -> None:
    """Refused for what is wrong with the snapshot, not because the step is unknown."""
    reply = _assert_refused(_call(site, "submit", body), name)
    want = "BODY_TOO_LARGE" if name == "train-body-oversized" else "BAD_PARAMS"
    assert reply["error"]["code"] == want, reply


@pytest.mark.parametrize(
    ("name", "verb", "body"), HOSTILE_OTHER, ids=[n for n, _, _ in HOSTILE_OTHER]
)
def test_hostile_reads_are_refused(
    site: Path, ok_job: Path, name: str, verb: str, body: bytes
) -> None:
    proc = _call(site, verb, body)
    if name == "cancel-missing":
        assert _assert_refused(proc, name)["error"]["code"] == "NOT_FOUND"
        return
    if name == "status-subst":  # a valid-looking but unsafe id: refused by the model
        _assert_refused(proc, name)
        return
    reply = _assert_refused(proc, name)
    assert "root:" not in json.dumps(reply), f"{name}: leaked /etc/passwd"
    assert "0123456789abcdef-sess" not in json.dumps(reply), f"{name}: leaked the session key"


# -- callers: the forced command's --caller, and one caller's jobs against another -------------
HOSTILE_CALLERS = [
    f"bob;touch {C}",
    f"$(touch {C})",
    f"`touch {C}`",
    f"bob && touch {C}",
    "../alice",
    "alice/x",
    "local",  # reserved for calls without --caller
    "",
    "-rf",
    "--config=/etc/passwd",
    "a b",
    "alice\n",
    "alice\r",
    "alice,bob",
    '"alice"',
    ".hidden",
    "alice*",
    "x" * 65,
    "\uff41lice",  # fullwidth a
    "al\u0131ce",  # dotless i
]


@pytest.mark.parametrize("caller", HOSTILE_CALLERS, ids=[repr(c)[:30] for c in HOSTILE_CALLERS])
def test_hostile_callers_are_refused(site: Path, ok_job: Path, caller: str) -> None:
    before = sorted(p.name for p in (site.parent / "jobs").iterdir())
    probes = (("submit", sub(job_key="caller-probe")), ("status", b'{"job_ids":["ok-key"]}'))
    for verb, body in probes:
        reply = _assert_refused(_call(site, verb, body, caller=caller), repr(caller))
        assert reply["error"]["code"] == "CONFIG_ERROR", reply
        assert "authorized_keys" in reply["error"]["message"]  # the admin's fix
    after = sorted(p.name for p in (site.parent / "jobs").iterdir())
    assert after == before


def _as_missing(reply: dict, job_id: str) -> str:
    return json.dumps(reply).replace(job_id, "<id>")


@pytest.fixture(scope="module")
def running_job(site: Path) -> Iterator[Path]:
    """A job that runs while the hostile cancels try to touch it."""
    proc = _call(site, "submit", sub(job_key="by-target", params={"sleep_s": 120}))
    assert proc.returncode == 0, proc.stdout
    yield site.parent / "jobs" / "by-target"
    _call(site, "cancel", b'{"job_id": "by-target"}')


@pytest.mark.parametrize(("name", "by"), HOSTILE_BY, ids=[n for n, _ in HOSTILE_BY])
def test_hostile_cancel_by_is_refused_before_it_acts(
    site: Path, running_job: Path, name: str, by: Any
) -> None:
    body = json.dumps({"job_id": "by-target", "by": by}).encode()
    reply = _assert_refused(_call(site, "cancel", body), name)
    assert reply["error"]["code"] == "BAD_REQUEST", reply
    assert "by" in reply["error"]["message"], reply
    assert not (running_job / "cancelled_by.json").exists(), f"{name}: recorded"


def test_the_hostile_cancels_left_the_job_running(site: Path, running_job: Path) -> None:
    status = json.loads(_call(site, "status", b'{"job_ids": ["by-target"]}').stdout)
    assert status["jobs"][0]["state"] in ("PENDING", "RUNNING"), status
    assert status["jobs"][0]["reason"] is None or "cancelled" not in status["jobs"][0]["reason"]


def test_a_caller_cannot_see_or_touch_another_callers_job(site: Path, ok_job: Path) -> None:
    """alice's job looks exactly like a job that does not exist, to bob and to the default
    caller: status, log, result, cancel; and bob cannot take its key with a submit."""
    body = sub(job_key="alice-job", params={"sleep_s": 60})
    proc = _call(site, "submit", body, caller="alice")
    assert proc.returncode == 0, proc.stdout
    try:
        for intruder in ("bob", None):
            for verb, template in (
                ("status", '{"job_ids": ["%s"]}'),
                ("log", '{"job_id": "%s"}'),
                ("result", '{"job_id": "%s"}'),
                ("cancel", '{"job_id": "%s"}'),
                ("cancel", '{"job_id": "%s", "by": "mallory"}'),
            ):
                theirs = _call(site, verb, (template % "alice-job").encode(), caller=intruder)
                missing = _call(site, verb, (template % "never-was").encode(), caller=intruder)
                assert theirs.returncode == missing.returncode, (intruder, verb)
                assert _as_missing(json.loads(theirs.stdout), "alice-job") == _as_missing(
                    json.loads(missing.stdout), "never-was"
                ), (intruder, verb, theirs.stdout)
            taken = _assert_refused(_call(site, "submit", body, caller=intruder), "submit")
            assert taken["error"]["code"] == "CONFLICT"
        # bob's cancel did nothing: alice's job still runs, and alice sees it
        mine = _call(site, "status", b'{"job_ids": ["alice-job"]}', caller="alice")
        mine = json.loads(mine.stdout)
        assert mine["jobs"][0]["state"] in ("PENDING", "RUNNING"), mine
        # the default caller's job is hidden from bob in the same way
        bobs = json.loads(_call(site, "status", b'{"job_ids": ["ok-key"]}', caller="bob").stdout)
        assert bobs["jobs"][0]["state"] == "UNKNOWN"
        # the queue shows bob none of alice's jobs, and alice hers
        for who, want in (("bob", set()), (None, set()), ("alice", {"alice-job"})):
            queue = json.loads(_call(site, "queue", b"{}", caller=who).stdout)
            assert {j["job_id"] for j in queue["jobs"]} & {"alice-job"} == want, (who, queue)
    finally:
        _call(site, "cancel", b'{"job_id": "alice-job"}', caller="alice")
    record = json.loads((site.parent / "jobs" / "alice-job" / "job.json").read_text())
    assert record["caller"] == "alice"
    assert not (site.parent / "jobs" / "alice-job" / "cancelled_by.json").exists(), \
        "mallory's cancel of alice's job was recorded"
    audit = SiteConfig.load(site).audit_path.read_text().splitlines()
    callers = {json.loads(line).get("caller") for line in audit}
    assert {"alice", "bob", "local"} <= callers


def test_no_canary_and_secret_stays_in_its_file(site: Path, ok_job: Path) -> None:
    # runs last in this module (pytest keeps file order)
    assert not list(CANARY_DIR.glob("pwned-*")), "a hostile input executed a command"
    secret = "0123456789abcdef-sess"
    # the job has ended by now: it ended its session and removed secrets.json (hpc_jobs/run.py;
    # the file's 0600 mode while a job runs: tests/unit/test_omero_session_retire.py)
    secrets_file = ok_job / "secrets.json"
    deadline = time.monotonic() + 60
    while secrets_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not secrets_file.exists(), "the key outlived its job"
    for path in ok_job.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert secret not in path.read_text(errors="replace"), f"session key leaked into {path}"
    audit = SiteConfig.load(site).audit_path.read_text()
    assert secret not in audit
    assert len(audit.splitlines()) >= 60, "every call leaves an audit line"
