# One target per thing a person does. Every target installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
POSTGRES_TEST_URL ?= postgres://postgres@127.0.0.1:5432/stringsight

.PHONY: install run test test-fast test-sqlite test-postgres lint format screenshots bench

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

# The web server, a django-q2 worker and (without OPENAI_API_KEY) the LLM simulator, on SQLite.
run: install
	$(PY) manage.py rundev

# The whole suite on SQLite, then again on PostgreSQL.
test: test-sqlite test-postgres

# Quick iterations: everything but the end-to-end, browser, Node and benchmark
# tests (pytest markers), on SQLite unless DATABASE_URL says otherwise.
test-fast: install
	$(PY) -m pytest -m "not (e2e or browser or node or bench)" $(PYTEST_ARGS)

test-sqlite: install
	env -u DATABASE_URL $(PY) -m pytest $(PYTEST_ARGS)

test-postgres: install
	DATABASE_URL=$(POSTGRES_TEST_URL) $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Re-take docs/admin-job-list.png and docs/admin-job-page.png in a real browser.
screenshots: install
	STRINGSIGHT_SCREENSHOTS=1 $(PY) -m pytest tests/test_admin_browser.py

# The benchmarks of issue 7 on SQLite and PostgreSQL (BENCHMARKS.md); e.g. BENCH_ARGS="--only 1,2"
bench: install
	$(PY) bench/run_all.py --db both $(BENCH_ARGS)
