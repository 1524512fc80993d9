"""The HTTP/1.1 front of the simulator, on loopback: routing, latency and disconnect detection.

It speaks just enough HTTP/1.1 for httpx (keep-alive, pipelining, chunked bodies) and
watches the connection during a reply's latency, so that a client that gives up is
logged as ``aborted`` at the moment it left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import signal
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from llm_simulator.batches import MAX_LISTED, Batches
from llm_simulator.faults import Simulator
from llm_simulator.files import FILE_LIMIT_BYTES, ApiError
from llm_simulator.options import OptionError, SimulatorOptions

LOOPBACK_HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1"}
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
# A batch input file may be 200 MB; the multipart envelope around it is small.
MAX_UPLOAD_BYTES = FILE_LIMIT_BYTES + 1024 * 1024
READ_CHUNK = 256 * 1024


class _Malformed(Exception):
    """The client sent something that is not HTTP/1.1 we can answer; reply and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _Connection:
    """One client connection with its own read buffer.

    Owning the buffer lets us watch for the client going away during a reply's latency
    (by reading) without losing the bytes of a request it may have pipelined meanwhile.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.closed = False

    async def _fill(self) -> bool:
        try:
            data = await self.reader.read(READ_CHUNK)
        except ConnectionError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    async def read_until(self, separator: bytes, limit: int) -> bytes | None:
        """Bytes up to `separator` (consumed), or None if the client closed first."""
        searched = 0
        while (index := self.buffer.find(separator, searched)) < 0:
            if len(self.buffer) > limit:
                raise _Malformed(431, "request header fields too large")
            searched = max(0, len(self.buffer) - len(separator) + 1)
            if not await self._fill():
                return None
        data = bytes(self.buffer[:index])
        del self.buffer[: index + len(separator)]
        return data

    async def read_exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not await self._fill():
                return None
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def closed_within(self, seconds: float | None) -> bool:
        """Wait `seconds` (None: until the client leaves); True if the client left meanwhile."""
        if self.closed or self.writer.transport.is_closing():
            return True
        try:
            async with asyncio.timeout(seconds):
                while await self._fill():
                    pass
        except TimeoutError:
            return False
        return True

    def send(self, status: int, payload: dict | bytes, headers: dict, keep_alive: bool) -> bool:
        """Write a JSON response (raw bytes for a file's content); False (nothing written)
        if the client is already gone."""
        if self.closed or self.writer.transport.is_closing():
            return False
        if isinstance(payload, bytes):
            body, content_type = payload, "application/octet-stream"
        else:
            body, content_type = json.dumps(payload).encode(), "application/json"
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
            "Connection: keep-alive" if keep_alive else "Connection: close",
        ]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return True


async def _read_request(conn: _Connection) -> _Request | None:
    head = await conn.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
    if head is None:
        return None
    request_line, *header_lines = head.lstrip(b"\r\n").decode("latin-1").split("\r\n")
    try:
        method, target, version = request_line.split(" ")
    except ValueError:
        raise _Malformed(400, "malformed request line") from None
    headers = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise _Malformed(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    if headers.get("expect", "").lower() == "100-continue":
        conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    path, _, query = target.partition("?")
    body = await _read_body(conn, headers, MAX_UPLOAD_BYTES if path == "/v1/files" else MAX_BODY_BYTES)
    if body is None:
        return None
    connection = headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
    return _Request(method, path, query, headers, body, keep_alive)


async def _read_body(conn: _Connection, headers: dict, limit: int) -> bytes | None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(conn, limit)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _Malformed(400, "invalid Content-Length") from None
    if not 0 <= length <= limit:
        raise _Malformed(413, f"body larger than {limit} bytes")
    return await conn.read_exactly(length)


async def _read_chunked(conn: _Connection, limit: int) -> bytes | None:
    chunks, total = [], 0
    while True:
        size_line = await conn.read_until(b"\r\n", 1024)
        if size_line is None:
            return None
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise _Malformed(400, "invalid chunk size") from None
        total += size
        if total > limit:
            raise _Malformed(413, f"body larger than {limit} bytes")
        if size == 0:
            break
        chunk = await conn.read_exactly(size + 2)  # the chunk and its CRLF
        if chunk is None:
            return None
        chunks.append(chunk[:-2])
    while trailer := await conn.read_until(b"\r\n", MAX_HEAD_BYTES):
        pass  # trailers carry nothing we use
    return b"".join(chunks) if trailer is not None else None


class _Server:
    """HTTP/1.1 front of a Simulator: routing, latency and disconnect detection."""

    def __init__(self, simulator: Simulator):
        self.simulator = simulator
        self.batches = Batches(simulator)
        self.connections: set[asyncio.Task] = set()
        self.routes = {
            ("GET", "/v1/models"): self._models,
            ("GET", "/_sim/stats"): lambda request: (200, simulator.stats()),
            ("GET", "/_sim/requests"): self._requests,
            ("GET", "/_sim/batch-stats"): lambda request: (200, simulator.batch_stats()),
            ("GET", "/_sim/batch-lines"): self._batch_lines,
            ("POST", "/_sim/reset"): self._reset,
            ("GET", "/_sim/config"): lambda request: (200, simulator.options.as_dict()),
            ("POST", "/_sim/config"): self._configure,
        }
        files, batches = self.batches.files, self.batches
        # The Batch API's paths, with the ids they carry.
        self.batch_routes = (
            ("POST", re.compile(r"/v1/files"), self._upload),
            (
                "GET",
                re.compile(r"/v1/files/([\w-]+)"),
                lambda request, file_id: files.get(file_id).as_object(),
            ),
            ("DELETE", re.compile(r"/v1/files/([\w-]+)"), lambda request, file_id: files.delete(file_id)),
            (
                "GET",
                re.compile(r"/v1/files/([\w-]+)/content"),
                lambda request, file_id: files.get(file_id).content,
            ),
            ("POST", re.compile(r"/v1/batches"), self._create_batch),
            ("GET", re.compile(r"/v1/batches"), self._list_batches),
            (
                "GET",
                re.compile(r"/v1/batches/([\w-]+)"),
                lambda request, batch_id: batches.get(batch_id).as_object(),
            ),
            (
                "POST",
                re.compile(r"/v1/batches/([\w-]+)/cancel"),
                lambda request, batch_id: batches.cancel(batch_id).as_object(),
            ),
        )

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self.connections.add(task)
        conn = _Connection(reader, writer)
        try:
            while (request := await _read_request(conn)) and await self._respond(conn, request):
                await writer.drain()
        except _Malformed as exc:
            conn.send(exc.status, _error_body(str(exc), "invalid_request_error"), {}, keep_alive=False)
        except ConnectionError:
            pass  # the client went away between requests: nothing to answer
        except asyncio.CancelledError:
            # Only close_connections() cancels us. Python 3.11's start_server logs a handler
            # task that ends cancelled as an error, so end normally.
            pass
        finally:
            self.connections.discard(task)
            writer.close()

    async def close_connections(self):
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    async def _respond(self, conn: _Connection, request: _Request) -> bool:
        """Answer one request; True if the connection stays open for another."""
        if (request.method, request.path) == ("POST", "/v1/chat/completions"):
            return await self._chat(conn, request)
        handler = self.routes.get((request.method, request.path))
        if request.path.startswith(("/v1/files", "/v1/batches")) and self.simulator.options.batch_api:
            status, payload = self._batch_api(request)
            if await self._create_answer_held(conn, request, status):
                return False
        elif handler:
            status, payload = handler(request)
        elif any(path == request.path for _, path in self.routes):
            status, payload = 405, _error_body(f"{request.method} not allowed here", "invalid_request_error")
        else:
            status, payload = 404, _error_body(f"Unknown path {request.path}", "invalid_request_error")
        return conn.send(status, payload, {}, request.keep_alive) and request.keep_alive

    async def _chat(self, conn: _Connection, request: _Request) -> bool:
        simulator = self.simulator
        call = simulator.start_call(request.body, request.headers.get("authorization"))
        headers = {"x-request-id": f"req_sim{call.record['id']}", **call.reply.headers}
        try:
            if await self._held_while_paused(conn):
                simulator.end_call(call, aborted=True)
                return False
            delay = call.reply.delay
            if (delay is None or delay > 0) and await conn.closed_within(delay):
                simulator.end_call(call, aborted=True)
                return False
            if not conn.send(call.reply.status, call.reply.payload, headers, request.keep_alive):
                simulator.end_call(call, aborted=True)
                return False
            simulator.end_call(call)
        finally:
            # Server shutdown or an unexpected error: the record must still end.
            simulator.end_call(call, aborted=True)
        return request.keep_alive

    async def _create_answer_held(self, conn: _Connection, request: _Request, status: int) -> bool:
        """Hold a created batch's answer batch_create_delay_seconds; True if the client left
        meanwhile. The batch exists during the wait, as when a provider's answer is lost: a
        client killed now leaves a batch that only its metadata can lead back to."""
        delay = self.simulator.options.batch_create_delay_seconds
        if (request.method, request.path, status) != ("POST", "/v1/batches", 200) or not delay:
            return False
        return await conn.closed_within(delay)

    async def _held_while_paused(self, conn: _Connection) -> bool:
        """Wait while the simulator is paused; True if the client left meanwhile."""
        while self.simulator.options.paused:
            if await conn.closed_within(0.02):
                return True
        return False

    def _models(self, request: _Request) -> tuple[int, dict]:
        if not self.simulator.authorized(request.headers.get("authorization")):
            return 401, _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        models = [
            {"id": name, "object": "model", "created": 1700000000, "owned_by": "llm-simulator"}
            for name in self.simulator.options.models
        ]
        return 200, {"object": "list", "data": models}

    def _batch_api(self, request: _Request) -> tuple[int, dict | bytes]:
        if not self.simulator.authorized(request.headers.get("authorization")):
            return 401, _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        matches = [
            (method, handler, found)
            for method, pattern, handler in self.batch_routes
            if (found := pattern.fullmatch(request.path))
        ]
        for method, handler, found in matches:
            if method == request.method:
                try:
                    return 200, handler(request, *found.groups())
                except ApiError as exc:
                    return exc.status, exc.body()
        if matches:
            return 405, _error_body(f"{request.method} not allowed here", "invalid_request_error")
        return 404, _error_body(f"Unknown path {request.path}", "invalid_request_error")

    def _upload(self, request: _Request) -> dict:
        return self.batches.files.upload(request.headers.get("content-type", ""), request.body).as_object()

    def _create_batch(self, request: _Request) -> dict:
        try:
            body = json.loads(request.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(400, "We could not parse the JSON body of your request.")
        return self.batches.create(body).as_object()

    def _list_batches(self, request: _Request) -> dict:
        query = urllib.parse.parse_qs(request.query)
        limit = query.get("limit", ["20"])[0]
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LISTED:
            raise ApiError(400, f"limit must be a whole number from 1 to {MAX_LISTED}.", param="limit")
        return self.batches.page(int(limit), query.get("after", [None])[0])

    def _batch_lines(self, request: _Request) -> tuple[int, dict]:
        since = re.search(r"(?:^|&)since=(\d+)", request.query)
        return 200, {"lines": self.simulator.batch_lines(int(since.group(1)) if since else 0)}

    def _requests(self, request: _Request) -> tuple[int, dict]:
        since = re.search(r"(?:^|&)since=(\d+)", request.query)
        return 200, {"requests": self.simulator.requests(int(since.group(1)) if since else 0)}

    def _reset(self, request: _Request) -> tuple[int, dict]:
        self.simulator.reset()
        self.batches.reset()
        return 200, {"reset": True}

    def _configure(self, request: _Request) -> tuple[int, dict]:
        try:
            changes = json.loads(request.body or b"{}")
            if not isinstance(changes, dict):
                raise OptionError("the body must be a JSON object of options")
            options = self.simulator.configure(changes)
        except (ValueError, TypeError) as exc:  # OptionError and bad JSON are ValueErrors
            return 400, _error_body(str(exc), "invalid_request_error", "invalid_option")
        return 200, options.as_dict()


def _error_body(message: str, error_type: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def loopback_host(host: str) -> str:
    """The address to bind for `host`; anything but loopback is refused."""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the simulator binds to loopback only (127.0.0.1, ::1, localhost), not {host!r}")
    return LOOPBACK_HOSTS[host]


async def serve(
    host: str,
    port: int,
    options: SimulatorOptions | None = None,
    ready_callback: Callable[[str, int], None] | None = None,
):
    """Serve until cancelled; `ready_callback(host, port)` gets the bound port once listening."""
    server = _Server(Simulator(options))
    listener = await asyncio.start_server(server.handle, loopback_host(host), port, backlog=4096)
    bound_host, bound_port = listener.sockets[0].getsockname()[:2]
    if ready_callback:
        ready_callback(bound_host, bound_port)
    try:
        await asyncio.Future()
    finally:
        listener.close()
        await server.close_connections()
        await listener.wait_closed()


def run(
    host: str,
    port: int,
    options: SimulatorOptions | None = None,
    ready_callback: Callable[[str, int], None] | None = None,
):
    """Serve until SIGINT or SIGTERM, then return normally."""
    _raise_open_files_limit()
    asyncio.run(_serve_until_signalled(host, port, options, ready_callback))


async def _serve_until_signalled(host, port, options, ready_callback):
    task = asyncio.ensure_future(serve(host, port, options, ready_callback))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _raise_open_files_limit():
    # Thousands of idle keep-alive connections at high latency need more than the usual 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
