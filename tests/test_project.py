"""Project hygiene that users rely on: migrations are committed, every
setting read from the environment is documented in the README, the web
server is ready before its first request, and extraction/ stays plain
Python."""

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
    sources = "".join(
        path.read_text() for path in [*(ROOT / "jobs").rglob("*.py"), *(ROOT / "extraction").rglob("*.py")]
    )
    read = set(re.findall(r'env(?:bool|int|float|list|prices)\("([A-Z_]+)"', settings_source))
    read |= set(re.findall(r'os\.environ(?:\.get\(|\[)"([A-Z_]+)"', settings_source + sources))
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


def test_extraction_imports_neither_django_nor_jobs_nor_the_simulator():
    probe = (
        "import pkgutil, importlib, sys, extraction\n"
        "for module in pkgutil.iter_modules(extraction.__path__, 'extraction.'):\n"
        "    importlib.import_module(module.name)\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'django', 'jobs', 'llm_simulator'}))"
    )
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}

    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert loaded.stdout.strip() == "[]", loaded.stderr
