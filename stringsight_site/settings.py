"""Settings for StringSight Jobs, read from the environment.

Every variable is listed in the README's configuration table. Helpers fail
loudly on values they cannot read, so a typo never becomes a silent default.
"""

import json
import os
import re
from pathlib import Path

import dj_database_url
from corsheaders.defaults import default_headers as cors_default_headers
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def envbool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true or false)")


def envint(name: str, default: int | None, minimum: int = 0) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a whole number") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below its minimum of {minimum}")
    return number


def envfloat(name: str, default: float | None, minimum: float = 0.0) -> float | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below its minimum of {minimum}")
    return number


def envprices(name: str) -> dict[str, tuple[float | None, ...]]:
    """Each model's (input, output) list price, or (input, output,
    batch_input, batch_output) where the entry gives a batch price."""
    value = os.environ.get(name)
    if not value:
        return {}
    try:
        return {str(model): _prices(entry) for model, entry in json.loads(value).items()}
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        raise ImproperlyConfigured(
            f"{name} must be JSON mapping each model to [input, output] USD per million tokens, "
            'e.g. {"my-model": [0.5, 1.5]}, or to {"input", "output", "batch_input", "batch_output"} '
            "(the batch prices optional: half the list price by default)"
        ) from None


def _prices(entry) -> tuple[float | None, ...]:
    if isinstance(entry, list):
        if len(entry) not in (2, 4):
            raise ValueError(entry)
        listed, batch = entry[:2], entry[2:]
    else:
        if set(entry) - {"input", "output", "batch_input", "batch_output"}:
            raise KeyError(entry)
        listed = [entry["input"], entry["output"]]
        batch = [entry.get("batch_input"), entry.get("batch_output")]
        if batch == [None, None]:
            batch = []
    # A batch price left out is None: jobs.services.budgets.price_for knows the discount.
    return (*map(float, listed), *(None if price is None else float(price) for price in batch))


def envcount(name: str) -> int | None:
    """A whole number of at least 1, or None when unset."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return envint(name, 0, minimum=1)


LIMIT_NAMES = ("max_concurrency", "rpm", "tpm")


def envlimits(name: str) -> dict[str, dict[str, float]]:
    """Per-model endpoint limits: JSON mapping a model to some of
    max_concurrency, rpm and tpm, each a number of at least 1."""
    value = os.environ.get(name)
    if not value:
        return {}
    example = '{"gpt-4o-mini": {"max_concurrency": 50, "rpm": 5000, "tpm": 2000000}}'
    try:
        table = json.loads(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} is not JSON; e.g. {example}") from None
    if not isinstance(table, dict):
        raise ImproperlyConfigured(f"{name} must map each model to its limits, e.g. {example}")
    limits = {}
    for model, values in table.items():
        if not isinstance(values, dict) or not values:
            raise ImproperlyConfigured(f"{name}: {model!r} must map to some of {', '.join(LIMIT_NAMES)}")
        for key, number in values.items():
            if key not in LIMIT_NAMES:
                raise ImproperlyConfigured(f"{name}: {model!r} has {key!r}; use {', '.join(LIMIT_NAMES)}")
            if isinstance(number, bool) or not isinstance(number, int | float) or number < 1:
                raise ImproperlyConfigured(f"{name}: {model!r} {key} must be a number of at least 1")
        limits[str(model)] = {key: float(number) for key, number in values.items()}
    return limits


def envrate(name: str, default: str) -> str:
    value = os.environ.get(name) or default
    count, _, period = value.partition("/")
    if not (count.isdigit() and re.fullmatch(r"\d*\s*(s|sec|m|min|h|hour|d|day)", period.strip().lower())):
        raise ImproperlyConfigured(f"{name}={value!r} is not a rate such as 120/min, 5/h or 10/15min")
    return value


def envlist(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = envbool("DJANGO_DEBUG", True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false")
    # Development only: DEBUG is on, so this key never protects real sessions.
    SECRET_KEY = "dev-insecure-stringsight-jobs-key-do-not-use-in-production"

ALLOWED_HOSTS = envlist("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver" if DEBUG else "")
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS must be set when DJANGO_DEBUG is false")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "jobs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    # Inside CORS, so that the JSON errors it writes carry the CORS headers.
    "jobs.api.json_errors.JSONErrorsMiddleware",
    "jobs.api.limits.RequestSizeLimitMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "stringsight_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "stringsight_site.wsgi.application"

VAR_DIR = Path(os.environ.get("STRINGSIGHT_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}",
        conn_max_age=envint("DATABASE_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several worker processes write at once: WAL lets readers go on during a
    # write, IMMEDIATE takes the write lock at BEGIN (no lock upgrade that can
    # fail mid-transaction), and the busy timeout waits instead of failing.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # The tests' worker processes must see the test database, so it is a file.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test_db.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# `collectstatic` fills this for WhiteNoise, which serves it under gunicorn.
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

LOGIN_URL = "/admin/login/"

# A cache every web process shares (throttles count in ThrottleBucket instead).
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "stringsight_cache",
    },
    "qcluster": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
}

# Anonymous mode, for a single-user local setup whose frontend sends no
# credentials: anonymous callers then share every job that has no owner.
STRINGSIGHT_ALLOW_ANONYMOUS = envbool("STRINGSIGHT_ALLOW_ANONYMOUS", False)
# How many proxies stand in front of the web processes: anonymous callers
# (and admin logins) are then told apart by the address the farthest one
# saw in X-Forwarded-For; with none, by the connection's address.
STRINGSIGHT_TRUSTED_PROXIES = envint("STRINGSIGHT_TRUSTED_PROXIES", 0)
# Failed admin sign-ins per username and address.
STRINGSIGHT_ADMIN_LOGIN_RATE = envrate("STRINGSIGHT_ADMIN_LOGIN_RATE", "10/15min")

# Frontends on other origins (django-cors-headers); none are allowed by default.
CORS_ALLOWED_ORIGINS = envlist("CORS_ALLOWED_ORIGINS")
# A browser may send a start's Idempotency-Key too.
CORS_ALLOW_HEADERS = (*cors_default_headers, "idempotency-key")

# Behind TLS (directly or through a proxy that sets X-Forwarded-Proto).
STRINGSIGHT_TLS = envbool("STRINGSIGHT_TLS", False)
if STRINGSIGHT_TLS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = envint("STRINGSIGHT_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "jobs.api.errors.exception_handler",
    # Views with a throttle_scope are throttled at its rate, counted in the
    # database (an atomic update, shared by every web process).
    "DEFAULT_THROTTLE_CLASSES": ["jobs.api.throttling.ScopedDatabaseThrottle"],
    "DEFAULT_THROTTLE_RATES": {"job_start": envrate("STRINGSIGHT_START_RATE", "120/min")},
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["jobs.api.parsers.LimitedJSONParser"],
}

SPECTACULAR_SETTINGS = {
    "TITLE": "StringSight Jobs API",
    "DESCRIPTION": "Durable, cancellable LLM property-extraction jobs.",
    "VERSION": "1.0.0",
    # 3.1 schemas are plain JSON Schema, so tests validate responses against them.
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema and its docs describe the API; they hold no user data.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "COMPONENT_SPLIT_REQUEST": True,
    "PREPROCESSING_HOOKS": ["jobs.api.schema.drop_frontend_aliases"],
    # Swagger UI's files are served from this site, so the docs work offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# The task queue. The ORM broker keeps tasks in this database, so a job and
# its tasks commit together. `retry` must exceed `timeout`: a task still
# running when `retry` expires would be delivered a second time.
Q_TASK_TIMEOUT = envint("Q_TASK_TIMEOUT", 3600, minimum=10)
Q_CLUSTER = {
    "name": "stringsight",
    # Cluster statistics are written twice a second; keep them in process
    # memory rather than in the shared database cache.
    "cache": "qcluster",
    "orm": "default",
    "workers": envint("Q_WORKERS", 2, minimum=1),
    # One task waiting per cluster (django-q2's default is workers squared).
    # A job's tasks run until its rows run out, so a task a cluster holds
    # ahead only waits, and held there it cannot run on another machine:
    # with the default, a cluster took every task of a 6-task job.
    "queue_limit": 1,
    "timeout": Q_TASK_TIMEOUT,
    "retry": Q_TASK_TIMEOUT + 300,
    "max_attempts": 3,
    "ack_failures": True,
    "poll": envfloat("Q_POLL", 0.2, minimum=0.01),
    "save_limit": 500,
    "catch_up": False,
    "label": "Task queue",
}
if os.environ.get("Q_REDIS_URL"):
    Q_CLUSTER.pop("orm")
    Q_CLUSTER["redis"] = os.environ["Q_REDIS_URL"]

# The LLM. OPENAI_API_KEY and OPENAI_BASE_URL are the SDK's own variables; the
# key is read by the worker from the environment and never stored.
STRINGSIGHT_DEFAULT_MODEL = os.environ.get("STRINGSIGHT_DEFAULT_MODEL", "gpt-4o-mini")
STRINGSIGHT_LLM_TIMEOUT = envfloat("STRINGSIGHT_LLM_TIMEOUT", 120.0, minimum=1.0)
STRINGSIGHT_MAX_ATTEMPTS = envint("STRINGSIGHT_MAX_ATTEMPTS", 4, minimum=1)
STRINGSIGHT_RETRY_BASE_SECONDS = envfloat("STRINGSIGHT_RETRY_BASE_SECONDS", 1.0)
STRINGSIGHT_RETRY_MAX_SECONDS = envfloat("STRINGSIGHT_RETRY_MAX_SECONDS", 60.0)
# Limits of the LLM endpoint (OPENAI_BASE_URL with OPENAI_API_KEY), shared
# by every job, worker process and machine (in the database, or in Redis with
# Q_REDIS_URL): calls in flight, requests and tokens per minute. Unset, the
# workers still adapt to the endpoint's refusals (429) and headers.
# STRINGSIGHT_LLM_LIMITS (JSON) sets them for a model, which then has its own.
STRINGSIGHT_LLM_MAX_CONCURRENCY = envcount("STRINGSIGHT_LLM_MAX_CONCURRENCY")
STRINGSIGHT_LLM_RPM = envcount("STRINGSIGHT_LLM_RPM")
STRINGSIGHT_LLM_TPM = envcount("STRINGSIGHT_LLM_TPM")
STRINGSIGHT_LLM_LIMITS = envlimits("STRINGSIGHT_LLM_LIMITS")
STRINGSIGHT_LIMITS_REDIS_URL = os.environ.get("Q_REDIS_URL") or None
# Ask for JSON-schema structured output; turn off for endpoints without it
# (the parser reads free text either way).
STRINGSIGHT_STRUCTURED_OUTPUT = envbool("STRINGSIGHT_STRUCTURED_OUTPUT", True)

# Estimated prices in USD per million tokens (input, output), frozen on each
# job at start. STRINGSIGHT_PRICES (JSON, e.g. '{"my-model": [0.5, 1.5]}')
# adds models or overrides these list prices. A batch-mode job pays the
# batch price: half the list price, unless an entry gives its own (four
# prices, or {"input", "output", "batch_input", "batch_output"}).
STRINGSIGHT_PRICES = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "o4-mini": (1.10, 4.40),
}
STRINGSIGHT_PRICES.update(envprices("STRINGSIGHT_PRICES"))

# Spending, bounded by the operator. Models a start may name: by default
# those with a price (so every job's cost is known) and the default model;
# "*" allows any. A job without its own max_cost_usd gets the default one
# (when its model has a price). A user's jobs started in one UTC day may
# cost at most the daily budget together.
STRINGSIGHT_ALLOWED_MODELS = envlist(
    "STRINGSIGHT_ALLOWED_MODELS", ",".join(sorted({*STRINGSIGHT_PRICES, STRINGSIGHT_DEFAULT_MODEL}))
)
STRINGSIGHT_DEFAULT_MAX_COST_USD = envfloat("STRINGSIGHT_DEFAULT_MAX_COST_USD", None)
STRINGSIGHT_USER_DAILY_BUDGET_USD = envfloat("STRINGSIGHT_USER_DAILY_BUDGET_USD", None)

# Orchestration. Each qcluster worker process serves every running job at
# once: WORKER_CONCURRENCY is its LLM calls in flight, divided between
# owners, then between each owner's jobs (never more than a job's
# max_workers, nor an owner's USER_MAX_CONCURRENCY across all workers).
# The worker re-reads the jobs at least every CANCEL_POLL_SECONDS. Memory is
# bounded by the calls in flight, not by the jobs: a worker holds its calls
# and as many rows again ready to call.
STRINGSIGHT_WORKER_CONCURRENCY = envint("STRINGSIGHT_WORKER_CONCURRENCY", 64, minimum=1)
STRINGSIGHT_USER_MAX_CONCURRENCY = envint("STRINGSIGHT_USER_MAX_CONCURRENCY", None, minimum=1)
STRINGSIGHT_CANCEL_POLL_SECONDS = envfloat("STRINGSIGHT_CANCEL_POLL_SECONDS", 0.05, minimum=0.01)
# A claimed row's lease: its worker renews it (and its slot grant) four
# times a lease, whatever its LLM calls are doing, so a living worker keeps
# its rows through calls of any length while a dead one's rows go back to
# work one lease after its last renewal.
STRINGSIGHT_LEASE_SECONDS = envint("STRINGSIGHT_LEASE_SECONDS", 20, minimum=2)
# How often some worker sweeps (returns expired rows, re-enqueues the work of
# jobs whose workers died): every qcluster worker process offers to, and the
# database lets one through per interval.
STRINGSIGHT_SWEEP_SECONDS = envfloat("STRINGSIGHT_SWEEP_SECONDS", 5.0, minimum=0.1)
# How often some worker asks the provider how batch-mode jobs' batches are
# doing (and imports those that ended): on the same thread as the sweep,
# one worker process per interval.
STRINGSIGHT_BATCH_POLL_SECONDS = envfloat("STRINGSIGHT_BATCH_POLL_SECONDS", 10.0, minimum=0.1)
# A row whose worker died this many times is failed instead of retried, so
# one poisonous row cannot kill workers forever.
STRINGSIGHT_MAX_LEASE_EXPIRIES = envint("STRINGSIGHT_MAX_LEASE_EXPIRIES", 3, minimum=1)
# Names this process in rows' claimed_by (default: the host name).
STRINGSIGHT_WORKER_NAME = os.environ.get("STRINGSIGHT_WORKER_NAME", "")

# Request limits: each breach answers 4xx naming the limit.
STRINGSIGHT_MAX_ROWS = envint("STRINGSIGHT_MAX_ROWS", 50_000, minimum=1)
STRINGSIGHT_MAX_ROW_BYTES = envint("STRINGSIGHT_MAX_ROW_BYTES", 2 * 1024 * 1024, minimum=256)
STRINGSIGHT_MAX_WORKERS = envint("STRINGSIGHT_MAX_WORKERS", 256, minimum=1)
STRINGSIGHT_MAX_TOKENS_CAP = envint("STRINGSIGHT_MAX_TOKENS_CAP", 32_768, minimum=1)
# Queued and running jobs one user may have (anonymous callers share one
# count); a start or resume beyond it answers 429. Unset: no limit.
STRINGSIGHT_USER_MAX_ACTIVE_JOBS = envint("STRINGSIGHT_USER_MAX_ACTIVE_JOBS", None, minimum=1)
# What one start may cost the web process: its memory is a few bytes per
# byte of real transcripts (body, Python objects, stored text; measured in
# BENCHMARKS.md, "Memory per request").
STRINGSIGHT_MAX_REQUEST_BYTES = envint("STRINGSIGHT_MAX_REQUEST_BYTES", 128 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = STRINGSIGHT_MAX_REQUEST_BYTES
STRINGSIGHT_MAX_JSON_DEPTH = envint("STRINGSIGHT_MAX_JSON_DEPTH", 64, minimum=4)
# JSON values (objects, arrays, strings, numbers) in one body. A value costs
# Python a hundred bytes or so however short its text; the default is what
# real transcripts at the body limit hold (30 per KiB, rounded up), so no
# body costs more than those do.
STRINGSIGHT_MAX_JSON_VALUES = envint(
    "STRINGSIGHT_MAX_JSON_VALUES", STRINGSIGHT_MAX_REQUEST_BYTES // 1024 * 30, minimum=1000
)
# Properties kept from one LLM answer; the rest are counted as dropped.
STRINGSIGHT_MAX_PROPERTIES_PER_ROW = envint("STRINGSIGHT_MAX_PROPERTIES_PER_ROW", 50, minimum=1)
# system_prompt, custom_system_prompt and task_description, each.
STRINGSIGHT_MAX_PROMPT_BYTES = envint("STRINGSIGHT_MAX_PROMPT_BYTES", 64 * 1024, minimum=1024)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "jobs.events.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        "events": {"class": "logging.StreamHandler", "formatter": "json"},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        # Job and row events, one JSON line each.
        "stringsight.events": {"handlers": ["events"], "level": "INFO", "propagate": False},
        # The SDK's HTTP client logs every request at INFO; our own events say more.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
    },
}
