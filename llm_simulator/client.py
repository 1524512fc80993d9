"""A client for the LLM simulator's control endpoints (/_sim/...), used by
the tests and the benchmarks, and the line the simulator prints when it
is ready."""

import json
import urllib.request

# `manage.py llm_simulator` prints this, then its base URL, once it listens.
READY_PREFIX = "LLM simulator listening on "


class SimulatorClient:
    """Talks to a running simulator; `base_url` is what the openai SDK needs."""

    def __init__(self, base_url: str, *, timeout: float = 30.0):
        self.base_url = base_url
        self.root_url = base_url.removesuffix("/v1")
        self.timeout = timeout
        # An HTTP(S)_PROXY in the environment must not capture loopback calls.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def configure(self, **options) -> dict:
        """Change options at run time; a bad option raises urllib.error.HTTPError (400)."""
        return self._call("POST", "/_sim/config", options)

    def config(self) -> dict:
        return self._call("GET", "/_sim/config")

    def reset(self) -> None:
        self._call("POST", "/_sim/reset", {})

    def requests(self, since: int = 0) -> list[dict]:
        """The request log, from entry `since` on."""
        return self._call("GET", f"/_sim/requests?since={since}")["requests"]

    def stats(self) -> dict:
        return self._call("GET", "/_sim/stats")

    def batch_lines(self, since: int = 0) -> list[dict]:
        """The log of the batch lines answered (apart from the live calls), from entry `since` on."""
        return self._call("GET", f"/_sim/batch-lines?since={since}")["lines"]

    def batch_stats(self) -> dict:
        return self._call("GET", "/_sim/batch-stats")

    def _call(self, method: str, path: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.root_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with self._opener.open(request, timeout=self.timeout) as response:
            return json.load(response)
