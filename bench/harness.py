"""Shared plumbing for the benchmarks: options, the environment every
process gets, and the `Session` that ties a database, the simulator, the
web server and the workers together. Importing it starts nothing.

Everything runs as in production, on this machine: the LLM simulator, a web
server and `qcluster` workers are separate processes that talk over HTTP and
to a real database, and a benchmark drives them through the public API. A
`Session` owns one database kind for one process: Django is set up in this
process on the benchmark's database (to create the API user, and for the
few steps that seed data directly), and one simulator serves every
benchmark of the session.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.api import Api, JobRun, run_job
from bench.databases import BenchDatabase
from bench.measure import Report, Sampler, tree_pids
from bench.processes import (
    SIMULATOR_READY,
    Cluster,
    Profiler,
    Service,
    WebServer,
    describe_server,
)
from llm_simulator.client import SimulatorClient

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = ROOT / "var" / "bench"
DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/postgres"


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes; scripts add their own sizes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite; no verdicts")
    parser.add_argument("--workers", type=int, help="qcluster worker processes (Q_WORKERS)")
    parser.add_argument("--server", choices=("gunicorn", "runserver"), default="gunicorn")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="SQLite files and logs")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="a PostgreSQL server whose user may create databases (the database name is ignored)",
    )
    parser.add_argument(
        "--database-name",
        default=os.environ.get("BENCH_DATABASE_NAME", "stringsight_bench"),
        help="the benchmark database's name (and its SQLite file's), to keep runs on one server apart",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the web server and workers with py-spy (collapsed stacks, one file per process tree)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for the web server and workers, e.g. STRINGSIGHT_WORKER_CONCURRENCY=16",
    )
    return parser


def sized(args: argparse.Namespace, name: str, full, smoke):
    """An option's value: as given, else the full or smoke default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    return smoke if args.smoke else full


def main(run: Callable[[Session, argparse.Namespace], Report], parser, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.db == "both":
        return run_each_database(sys.argv[0], argv)
    stop_on_sigterm()
    with Session(args) as session:
        run(session, args).print()
    return 0


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the processes a session started (in
    sessions of their own, out of reach of the signal) are stopped too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def run_each_database(script: str, argv: list[str]) -> int:
    """Each database in its own process: Django is set up once per process."""
    codes = [
        subprocess.call([sys.executable, script, *without_option(argv, "--db"), "--db", kind])
        for kind in ("sqlite", "postgres")
    ]
    return max(codes)


def without_option(argv: list[str], name: str) -> list[str]:
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == name:
            skip = True
        elif not item.startswith(f"{name}="):
            kept.append(item)
    return kept


def base_env(*, database_url: str, work_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "stringsight_site.settings",
            "DATABASE_URL": database_url,
            # As deployed: no per-query log (DEBUG keeps one), and database
            # connections kept open, which also lets the sampler see every
            # PostgreSQL backend for its whole life.
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "bench-only-key-" + "0123456789abcdef" * 3,
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DATABASE_CONN_MAX_AGE": "600",
            "STRINGSIGHT_VAR_DIR": str(work_dir),
            # The largest starts measured must never meet the body limit.
            "STRINGSIGHT_MAX_REQUEST_BYTES": str(1 << 30),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def parse_env_options(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise SystemExit(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def setup_django(env: dict[str, str]) -> None:
    """Configure Django in this process for the benchmark database. Once per
    process: settings are read from the environment when Django starts."""
    import django
    from django.apps import apps

    if apps.ready:
        if os.environ.get("DATABASE_URL") != env["DATABASE_URL"]:
            raise RuntimeError("Django is already set up on another database in this process")
        return
    for name in (
        "DJANGO_SETTINGS_MODULE",
        "DATABASE_URL",
        "DJANGO_DEBUG",
        "DJANGO_SECRET_KEY",
        "DJANGO_ALLOWED_HOSTS",
        "DATABASE_CONN_MAX_AGE",
        "STRINGSIGHT_VAR_DIR",
    ):
        os.environ[name] = env[name]
    django.setup()


class Session:
    """One database kind in this process, with the simulator every
    benchmark of the session shares."""

    def __init__(self, args: argparse.Namespace):
        self.kind = args.db
        self.smoke = args.smoke
        self.server = args.server
        self.web_workers = args.web_workers
        self.work_dir = args.work_dir.resolve()
        self.extra_env = parse_env_options(args.env)
        self.profile_dir = args.profile.resolve() if args.profile else None
        # A smoke run may overlap another engineer's on the same PostgreSQL server.
        name = f"stringsight_bench_smoke_{os.getpid()}" if self.smoke else args.database_name
        self.database = BenchDatabase(
            self.kind, name=name, work_dir=self.work_dir, postgres_url=args.postgres_url
        )
        self.token = ""
        self.simulator: SimulatorClient | None = None
        self._simulator_service: Service | None = None
        self._log_counter = itertools.count(1)

    def __enter__(self) -> Session:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.work_dir / "logs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        env = self.env()
        self._simulator_service = Service(
            "llm_simulator",
            [sys.executable, "manage.py", "llm_simulator", "--port", "0"],
            env,
            self.log_path("simulator"),
        )
        self._simulator_service.spawn()
        self.database.create_template(env)
        setup_django(env)
        match = self._simulator_service.wait_ready(SIMULATOR_READY.search)
        self.simulator = SimulatorClient(match.group(1))
        self._simulator_defaults = self.simulator.config()
        return self

    def __exit__(self, *exc_info) -> None:
        from django.db import connections

        if self._simulator_service:
            self._simulator_service.stop(signal.SIGTERM)
        connections.close_all()
        self.database.drop(keep_data=not self.smoke)

    @property
    def simulator_pid(self) -> int:
        return self._simulator_service.pid

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{next(self._log_counter):02d}-{name}.log"

    def env(self, **overrides: str) -> dict[str, str]:
        return base_env(
            database_url=self.database.url,
            work_dir=self.work_dir,
            extra={**self.extra_env, **{k: str(v) for k, v in overrides.items()}},
        )

    def fresh_database(self) -> None:
        """A new migrated database with a `bench` user whose token the API client uses."""
        from django.contrib.auth import get_user_model
        from django.db import connections
        from rest_framework.authtoken.models import Token

        connections.close_all()
        self.database.recreate()
        user = get_user_model().objects.create_user("bench", password=None)
        self.token = Token.objects.create(user=user).key

    def simulate(self, *, latency_ms: float, jitter_ms: float = 0.0, **faults) -> None:
        """Set the simulator's latency and fault rates and clear its log. What
        is not given is back at the simulator's start-up value, so no fault
        of an earlier benchmark leaks into the next."""
        options = {**self._simulator_defaults, "latency_ms": latency_ms, "jitter_ms": jitter_ms, **faults}
        self.simulator.configure(**options)
        self.simulator.reset()

    @contextlib.contextmanager
    def web(self, **env: str) -> Iterator[WebServer]:
        with self.running(self.web_server(**env)) as (server,):
            yield server

    @contextlib.contextmanager
    def cluster(self, workers: int, **env: str) -> Iterator[Cluster]:
        with self.running(self.qcluster(workers, **env)) as (cluster,):
            yield cluster

    @contextlib.contextmanager
    def web_and_cluster(self, workers: int, **env: str) -> Iterator[tuple[WebServer, Cluster]]:
        with self.running(self.web_server(**env), self.qcluster(workers, **env)) as both:
            yield both

    def run_job(self, body: bytes, *, workers: int) -> JobRun:
        """One job over HTTP against a fresh web server and a cluster of
        `workers`, with every process's CPU sampled throughout."""
        with (
            self.web_and_cluster(workers) as (web, cluster),
            self.sampler(web=web, cluster=cluster) as sampler,
        ):
            return run_job(self.api(web), sampler, body)

    def web_server(self, **env: str) -> WebServer:
        return WebServer(self.server, self.env(**env), self.log_path("web"), workers=self.web_workers)

    def qcluster(self, workers: int, **env: str) -> Cluster:
        env = self.env(
            OPENAI_BASE_URL=self.simulator.base_url, OPENAI_API_KEY="sim-key", Q_WORKERS=str(workers), **env
        )
        return Cluster(env, self.log_path("qcluster"), workers=workers)

    @contextlib.contextmanager
    def running(self, *services):
        """Start the services side by side (each takes a second or two to
        import Django), and stop them all at the end."""
        profilers = []
        try:
            for service in services:
                service.spawn()
            for service in services:
                service.wait_ready()
            if self.profile_dir:
                profilers = [self.profiler(service) for service in services]
            yield services
        finally:
            for profiler in profilers:
                profiler.stop()
            for service in services:
                service.request_stop()
            for service in services:
                service.wait_stopped()

    def profiler(self, service) -> Profiler:
        name = service.service.log_path.stem
        profiler = Profiler(service.service, self.profile_dir / f"{self.log_dir.name}-{name}.txt")
        profiler.start()
        return profiler

    def api(self, web: WebServer) -> Api:
        return Api(web.base_url, self.token)

    def sampler(
        self, *, web: WebServer | None = None, cluster: Cluster | None = None, simulator: bool = True
    ) -> Sampler:
        groups = {"simulator": tree_pids(self.simulator_pid)} if simulator else {}
        if web:
            groups["web"] = tree_pids(web.pid)
        if cluster:
            groups["worker"] = tree_pids(cluster.pid)
        if self.kind == "postgres":
            groups["database"] = self.database.backend_pids
        return Sampler(groups)

    def describe(self, report: Report, *, workers: int | None = None) -> None:
        report.setting("database", self.database.describe())
        report.setting("web server", describe_server(self.server, self.web_workers))
        if workers is not None:
            report.setting("qcluster", f"1 cluster, Q_WORKERS={workers} worker process(es)")
        if self.extra_env:
            report.setting("extra settings", " ".join(f"{k}={v}" for k, v in self.extra_env.items()))

    def cpu_figures(self, report: Report, window, *, per: int) -> None:
        """CPU ms per row of each process group, and how busy each was."""
        groups = ["web", "worker", "database", "simulator"]
        for group in groups:
            if group in window.cpu:
                report.figure(f"CPU ms/row: {group}", window.cpu_ms_per(group, per), "{:,.2f}")
            elif group == "database" and self.kind == "sqlite":
                report.figure("CPU ms/row: database", "in the web and worker processes (SQLite)")
        busy = ", ".join(f"{group} {window.busy(group):.0%}" for group in groups if group in window.cpu)
        report.figure("CPU busy (100% = one core)", busy)
