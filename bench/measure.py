"""What the benchmarks measure with: CPU time and memory of process trees
(psutil), percentiles, and the results table every script prints."""

from __future__ import annotations

import datetime
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PidFinder = Callable[[], Iterable[int]]


def tree_pids(root: int) -> Callable[[], list[int]]:
    """A finder for a process and all its descendants (qcluster forks its
    workers, gunicorn its web workers)."""

    def find() -> list[int]:
        try:
            parent = psutil.Process(root)
            return [root, *(child.pid for child in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    return find


def vm_hwm_bytes(pid: int) -> int | None:
    """The kernel's own peak resident set of a live process (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Window:
    """CPU seconds and memory of each group between open_window() and close_window()."""

    started: float
    cpu_start: dict[str, float]
    rss_start: dict[tuple[str, int], int]
    peak_rss: dict[tuple[str, int], int] = field(default_factory=dict)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def cpu_ms_per(self, group: str, count: int) -> float:
        return 1000 * self.cpu.get(group, 0.0) / max(count, 1)

    def busy(self, group: str) -> float:
        """CPU seconds per wall second: 1.0 is one core kept busy."""
        return self.cpu.get(group, 0.0) / self.wall if self.wall else 0.0

    def rss_growth_of(self, group: str) -> int:
        """The largest rise of any one process's RSS above where it started."""
        return max(
            (
                rss - self.rss_start.get((name, pid), rss)
                for (name, pid), rss in self.peak_rss.items()
                if name == group
            ),
            default=0,
        )


class Sampler:
    """Polls groups of processes for CPU time and RSS on a background thread.

    Each process's CPU time is its last sample, so a process that exits
    loses at most one interval; the benchmarks keep their processes (and
    database connections) alive for the whole measurement for that reason.
    """

    def __init__(self, groups: dict[str, PidFinder], interval: float = 0.2):
        self.groups = groups
        self.interval = interval
        self._processes: dict[int, psutil.Process] = {}
        self._cpu: dict[tuple[str, int], float] = {}
        self._rss: dict[tuple[str, int], int] = {}
        self._windows: list[Window] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            for group, find in self.groups.items():
                for pid in find():
                    self._sample_one(group, pid)

    def _sample_one(self, group: str, pid: int) -> None:
        process = self._processes.get(pid)
        if process is None:
            try:
                process = self._processes[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return
        try:
            with process.oneshot():
                times = process.cpu_times()
                rss = process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return
        key = (group, pid)
        self._cpu[key] = times.user + times.system
        self._rss[key] = rss
        for window in self._windows:
            window.peak_rss[key] = max(window.peak_rss.get(key, 0), rss)

    def cpu_totals(self) -> dict[str, float]:
        totals = dict.fromkeys(self.groups, 0.0)
        for (group, _), seconds in self._cpu.items():
            totals[group] += seconds
        return totals

    def open_window(self) -> Window:
        self.sample()
        with self._lock:
            window = Window(time.monotonic(), self.cpu_totals(), dict(self._rss), dict(self._rss))
            self._windows.append(window)
        return window

    def close_window(self, window: Window) -> Window:
        self.sample()
        with self._lock:
            self._windows.remove(window)
            window.wall = time.monotonic() - window.started
            end = self.cpu_totals()
            window.cpu = {group: end[group] - window.cpu_start.get(group, 0.0) for group in end}
        return window


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0..100), interpolated between the closest ranks
    as numpy's default does."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean_in_flight(requests: list[dict], start: float, end: float) -> float:
    """The average number of LLM calls open between `start` and `end`, from
    the simulator's log: how well the slots were kept busy."""
    if end <= start:
        return 0.0
    busy = sum(max(0.0, min(r["ended_at"] or end, end) - max(r["started_at"], start)) for r in requests)
    return busy / (end - start)


def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {memory:.1f} GiB RAM, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


@dataclass
class Figure:
    name: str
    value: str
    target: str = ""
    ok: bool | None = None


class Report:
    """One benchmark's results: the settings it ran with, then a markdown
    table of figures, each with its target and verdict where it has one."""

    def __init__(self, title: str, *, smoke: bool):
        self.title = title
        self.smoke = smoke
        self.settings: list[tuple[str, str]] = [
            ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
            ("machine", machine_description()),
            ("load average at start", load_average()),
        ]
        self.figures: list[Figure] = []
        self.notes: list[str] = []

    def setting(self, name: str, value) -> None:
        self.settings.append((name, str(value)))

    def figure(self, name: str, value, fmt: str = "{:,.1f}", *, target: str = "", ok: bool | None = None):
        shown = value if isinstance(value, str) else fmt.format(value)
        self.figures.append(Figure(name, shown, target, ok))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def verdict(self, figure: Figure) -> str:
        if figure.ok is None:
            return ""
        if self.smoke:
            return "(smoke)"
        return "PASS" if figure.ok else "MISS"

    def render(self) -> str:
        lines = [f"### {self.title}", ""]
        lines += [f"- {name}: {value}" for name, value in self.settings]
        lines.append(f"- load average at end: {load_average()}")
        if self.smoke:
            lines.append("- SMOKE RUN: tiny sizes, targets not judged")
        lines += ["", "| figure | measured | target | verdict |", "|---|---:|---|---|"]
        lines += [f"| {f.name} | {f.value} | {f.target} | {self.verdict(f)} |" for f in self.figures]
        if self.notes:
            lines.append("")
            lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def print(self) -> None:
        print(self.render(), flush=True)

    @property
    def missed(self) -> list[str]:
        return [f.name for f in self.figures if f.ok is False]
