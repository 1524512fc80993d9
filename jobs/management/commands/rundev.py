"""Everything a newcomer needs in one terminal: migrations, an admin user
with an API token, the web server, a django-q2 worker, and the LLM
simulator when no OPENAI_API_KEY is set."""

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token

MANAGE = str(Path(settings.BASE_DIR) / "manage.py")


class Command(BaseCommand):
    help = "Run the web server, a worker and (without OPENAI_API_KEY) the LLM simulator."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=8000, help="web server port")
        parser.add_argument("--simulator-port", type=int, default=8765)

    def handle(self, *args, port, simulator_port, **options):
        call_command("migrate", interactive=False, verbosity=0)
        password = self.ensure_admin()
        token = Token.objects.get_or_create(user=get_user_model().objects.get(username="admin"))[0].key

        # A shell without job control starts background commands with SIGINT
        # ignored, and children inherit that: restore it, or the web server
        # would ignore the stop signal and be killed after the grace period.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        env = dict(os.environ)
        simulated = not env.get("OPENAI_API_KEY")
        children = []
        if simulated:
            children.append(
                self.spawn(
                    "llm_simulator",
                    "--port",
                    str(simulator_port),
                    "--latency-ms",
                    "800",
                    "--jitter-ms",
                    "400",
                )
            )
            env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{simulator_port}/v1"
            env["OPENAI_API_KEY"] = "sim-local-key"
        children.append(self.spawn("qcluster", env=env))
        children.append(self.spawn("runserver", f"127.0.0.1:{port}", "--noreload", env=env))
        self.banner(port=port, password=password, token=token, simulated=simulated, env=env)
        self.wait(children)

    def ensure_admin(self) -> str | None:
        secret_file = Path(settings.VAR_DIR) / "dev-admin-password"
        users = get_user_model().objects
        if not users.filter(username="admin").exists():
            password = secrets.token_urlsafe(12)
            users.create_superuser("admin", "admin@localhost", password)
            secret_file.write_text(password)
            secret_file.chmod(0o600)
        return secret_file.read_text().strip() if secret_file.exists() else None

    def spawn(self, command, *arguments, env=None):
        # Each child in its own session: a terminal's Ctrl-C reaches only this
        # command, which then stops each child exactly once (a qcluster that
        # gets SIGINT twice can hang halfway through stopping).
        return subprocess.Popen(
            [sys.executable, MANAGE, command, *arguments],
            env=env or os.environ.copy(),
            start_new_session=True,
        )

    def banner(self, *, port, password, token, simulated, env):
        base = f"http://127.0.0.1:{port}"
        lines = [
            "",
            "=" * 72,
            "StringSight Jobs is running (Ctrl-C stops everything)",
            f"  API docs (Swagger): {base}/api/docs/",
            f"  Admin:              {base}/admin/   user: admin   password: "
            + (password or "(yours; reset with: python manage.py changepassword admin)"),
            f"  API token (admin):  {token}",
            f"  Database:           {settings.DATABASES['default']['NAME']}",
            "",
            "  Try it:",
            f"    curl -s -X POST {base}/extract/jobs/start -H 'Authorization: Token {token}' \\",
            "      -H 'Content-Type: application/json' \\",
            '      -d \'{"rows": [{"prompt": "What is 2+2?", "model": "demo", "model_response": "5"}]}\'',
            f"    curl -s '{base}/extract/jobs/status?job_id=JOB_ID' -H 'Authorization: Token {token}'",
        ]
        if simulated:
            lines += [
                "",
                "  !! OPENAI_API_KEY is not set: LLM calls go to the local SIMULATOR at",
                f"  !! {env['OPENAI_BASE_URL']}. Properties are SYNTHETIC, not from a real model.",
                "  !! Set OPENAI_API_KEY (and OPENAI_BASE_URL for other providers) to use a real LLM.",
            ]
        else:
            lines.append(f"  LLM endpoint:       {env.get('OPENAI_BASE_URL') or 'https://api.openai.com/v1'}")
        lines.append("=" * 72)
        self.stdout.write("\n".join(lines))
        self.stdout.flush()

    def wait(self, children):
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping and all(child.poll() is None for child in children):
                time.sleep(0.3)
        except KeyboardInterrupt:
            pass
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 15
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            # Whatever is left of the child's group (a cluster's workers) goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        failed = [child.args[2] for child in children if child.returncode not in (0, -2, -15, None)]
        if failed:
            self.stderr.write(f"stopped: {', '.join(failed)} exited with an error")
