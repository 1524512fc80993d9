"""The job API over HTTP, as the StringSight frontend calls it, and one
job's run from its start request to its end."""

from __future__ import annotations

import datetime
import http.client
import json
import time
from dataclasses import dataclass

from bench.measure import Report, Sampler, Window, mean_in_flight

FINISHED_STATES = ("done", "cancelled", "error")


class ApiError(RuntimeError):
    pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise ApiError(f"timed out waiting for {what}")
        time.sleep(interval)
    return value


class Response:
    def __init__(self, status: int, body: bytes, seconds: float):
        self.status = status
        self.body = body
        self.seconds = seconds

    def json(self):
        return json.loads(self.body)


class Api:
    """The job API over HTTP, with token auth and a kept-alive connection,
    calling the StringSight frontend's own paths as the frontend does."""

    def __init__(self, base_url: str, token: str):
        self.address = base_url.removeprefix("http://")
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
        self._connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None) -> Response:
        # A kept-alive connection that the server closed while it sat idle
        # fails on first use; the request then goes again on a fresh one.
        for attempt in (1, 2):
            connection = self._connection or http.client.HTTPConnection(self.address, timeout=600)
            self._connection = connection
            started = time.perf_counter()
            try:
                connection.request(method, path, body=body, headers=self.headers)
                response = connection.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection.close()
                self._connection = None
                if attempt == 2:
                    raise
                continue
            if response.will_close:
                connection.close()
                self._connection = None
            return Response(response.status, data, time.perf_counter() - started)
        raise AssertionError("unreachable")

    def expect(self, response: Response, status: int = 200) -> dict:
        if response.status != status:
            raise ApiError(f"expected {status}, got {response.status}: {response.body[:500]!r}")
        return response.json()

    def start(self, body: bytes) -> Response:
        return self.request("POST", "/extract/jobs/start", body)

    def status(self, job_id: str) -> Response:
        return self.request("GET", f"/extract/jobs/status?job_id={job_id}")

    def cancel(self, job_id: str) -> Response:
        return self.request("POST", "/extract/jobs/cancel", json.dumps({"job_id": job_id}).encode())

    def stream(self, path: str, chunk_size: int = 256 * 1024) -> dict:
        """GET a streamed body on a connection of its own, counting bytes
        and lines without keeping them."""
        connection = http.client.HTTPConnection(self.address, timeout=600)
        started = time.perf_counter()
        connection.request("GET", path, headers=self.headers)
        response = connection.getresponse()
        first_byte = None
        size = lines = 0
        while chunk := response.read1(chunk_size):
            first_byte = first_byte or time.perf_counter() - started
            size += len(chunk)
            lines += chunk.count(b"\n")
        connection.close()
        return {
            "status": response.status,
            "bytes": size,
            "lines": lines,
            "first_byte_seconds": first_byte,
            "seconds": time.perf_counter() - started,
        }

    def wait_finished(self, job_id: str, *, interval: float = 0.25, timeout: float = 3600) -> dict:
        """Poll the status as the frontend does until the job has finished."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.expect(self.status(job_id))
            if status["state"] in FINISHED_STATES:
                return status
            if time.monotonic() > deadline:
                raise ApiError(f"job {job_id} did not finish within {timeout} s: {status}")
            time.sleep(interval)


def timestamp(value: str) -> float:
    """An API timestamp as seconds since the epoch, like the simulator's log."""
    return datetime.datetime.fromisoformat(value).timestamp()


@dataclass
class JobRun:
    """One job from the start request to its end, as the client saw it."""

    final: dict
    start_seconds: float
    e2e_seconds: float
    window: Window

    @property
    def started_at(self) -> float:
        return timestamp(self.final["started_at"])

    @property
    def finished_at(self) -> float:
        return timestamp(self.final["finished_at"])

    @property
    def running_seconds(self) -> float:
        return self.finished_at - self.started_at

    @property
    def finished_rows(self) -> int:
        return self.final["count_done"] + self.final["count_failed"]


def run_job(api: Api, sampler: Sampler, body: bytes, *, poll_interval: float = 0.25) -> JobRun:
    """Start a job over HTTP and poll its status until it ends, sampling CPU
    throughout. End to end runs from sending the start request to the
    job's own finished_at (the poll interval does not count); running is
    the job's started_at to finished_at."""
    window = sampler.open_window()
    sent = time.time()
    started = api.start(body)
    job = api.expect(started, 201)
    final = api.wait_finished(job["job_id"], interval=poll_interval)
    sampler.close_window(window)
    if final["state"] != "done":
        raise ApiError(f"job {job['job_id']} ended {final['state']}: {final.get('error')}")
    finished = timestamp(final["finished_at"])
    return JobRun(
        final=final,
        start_seconds=started.seconds,
        e2e_seconds=finished - sent,
        window=window,
    )


def job_figures(report: Report, run: JobRun, llm_requests: list[dict] | None = None) -> None:
    report.figure("start request (POST → 201)", run.start_seconds, "{:,.2f} s")
    report.figure("running (started_at → finished_at)", run.running_seconds, "{:,.2f} s")
    report.figure("end to end (POST sent → finished_at)", run.e2e_seconds, "{:,.2f} s")
    report.figure("rows done / failed", f"{run.final['count_done']:,} / {run.final['count_failed']:,}")
    if llm_requests is not None:
        report.figure(
            "LLM calls in flight while running, mean (simulator log)",
            mean_in_flight(llm_requests, run.started_at, run.finished_at),
        )
