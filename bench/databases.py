"""A fresh, migrated database for each benchmark, on SQLite or PostgreSQL."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def with_database_name(server_url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


class BenchDatabase:
    """A fresh, migrated database for each benchmark: copied from a template
    that is migrated once per session, so a benchmark never sees another's
    rows and the suite's test database is never touched."""

    def __init__(self, kind: str, *, name: str, work_dir: Path, postgres_url: str):
        self.kind = kind
        self.name = name
        self.postgres_url = postgres_url
        if kind == "sqlite":
            self.path = work_dir / f"{name}.sqlite3"
            self.template_path = work_dir / f"{name}-template.sqlite3"
            self.url = f"sqlite:///{self.path}"
            self.template_url = f"sqlite:///{self.template_path}"
        else:
            self.template_name = f"{name}_template"
            self.url = with_database_name(postgres_url, name)
            self.template_url = with_database_name(postgres_url, self.template_name)
        self._monitor = None

    def describe(self) -> str:
        if self.kind == "sqlite":
            return f"SQLite {sqlite3.sqlite_version} (WAL), file {self.path}"
        with self._admin() as connection:
            version = connection.execute("SHOW server_version").fetchone()[0]
        return f"PostgreSQL {version}, database {self.name}"

    def _admin(self):
        import psycopg

        # The maintenance database always exists; the URL's own may not.
        return psycopg.connect(with_database_name(self.postgres_url, "postgres"), autocommit=True)

    def create_template(self, env: dict[str, str]) -> None:
        if self.kind == "sqlite":
            self._remove_sqlite(self.template_path)
        else:
            with self._admin() as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{self.template_name}" WITH (FORCE)')
                connection.execute(f'CREATE DATABASE "{self.template_name}"')
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--no-input", "-v", "0"],
            cwd=ROOT,
            env={**env, "DATABASE_URL": self.template_url},
            check=True,
        )

    def recreate(self) -> None:
        """Replace the benchmark database with a copy of the template. Every
        connection to it must be closed first."""
        if self.kind == "sqlite":
            self._remove_sqlite(self.path)
            shutil.copyfile(self.template_path, self.path)
            return
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{self.name}" TEMPLATE "{self.template_name}"')

    def drop(self, *, keep_data: bool) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self.kind == "sqlite":
            self._remove_sqlite(self.template_path)
            if not keep_data:
                self._remove_sqlite(self.path)
            return
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.template_name}" WITH (FORCE)')
            if not keep_data:
                connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def backend_pids(self) -> list[int]:
        """The PostgreSQL backends serving this database now, asked on a
        connection of its own to the maintenance database."""
        if self._monitor is None:
            self._monitor = self._admin()
        rows = self._monitor.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.name,))
        return [pid for (pid,) in rows]

    @staticmethod
    def _remove_sqlite(path: Path) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
