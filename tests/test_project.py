"""Project hygiene that users rely on: migrations are committed, and every
setting read from the environment is documented in the README, and the web
server is ready before its first request."""

import os
import re
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db
def test_migrations_are_committed():
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


def test_every_environment_variable_is_in_the_readme_table():
    settings_source = (ROOT / "stringsight_site" / "settings.py").read_text()
    runner_source = (ROOT / "jobs" / "runner.py").read_text()
    read = set(re.findall(r'env(?:bool|int|float|list|prices)\("([A-Z_]+)"', settings_source))
    read |= set(re.findall(r'os\.environ(?:\.get\(|\[)"([A-Z_]+)"', settings_source + runner_source))
    table_rows = re.findall(r"^\| `([A-Z_]+)` \|", (ROOT / "README.md").read_text(), flags=re.MULTILINE)

    assert read - set(table_rows) == set()
    assert "OPENAI_API_KEY" in read


def test_the_wsgi_application_has_its_views_loaded_before_the_first_request():
    probe = "import sys, stringsight_site.wsgi; print('jobs.api.views' in sys.modules)"
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}

    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert loaded.stdout.strip() == "True", loaded.stderr


def test_extraction_does_not_import_the_simulator():
    probe = (
        "import sys, pkgutil, importlib, extraction\n"
        "for module in pkgutil.iter_modules(extraction.__path__):\n"
        "    importlib.import_module('extraction.' + module.name)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('llm_simulator', 'django')))"
    )

    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    assert loaded.stdout.strip() == "[]", loaded.stderr
