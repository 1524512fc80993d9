"""An OpenAI-compatible chat-completions simulator served over HTTP on loopback.

Tests, the dev server and benchmarks reach it through the real ``openai`` SDK, and it
answers like a property-extraction model would: a few plausible properties quoted from
the transcript it was sent. Faults come from rates or from markers in the user content,
and every chat request is logged so that tests in another process can prove when calls
started and stopped.

- ``options``: ``SimulatorOptions``, what a test or a flag may change;
- ``faults``: ``Simulator``, the fault model, the request log and the stats;
- ``answers``: ``compose_answer``, what the model says about a transcript;
- ``files``, ``batches``: the Files and Batch API (``/v1/files``, ``/v1/batches``), whose
  lines are answered as live calls are, in the background;
- ``server``: the HTTP/1.1 server (``serve``, ``run``);
- ``client``: ``SimulatorClient`` for the control endpoints (``/_sim/...``);
- ``command``: the command line (``python -m llm_simulator``, ``manage.py llm_simulator``).

Standard library only: it must start fast and never be a benchmark's bottleneck.
"""

from llm_simulator.answers import compose_answer, describe_transcript
from llm_simulator.client import READY_PREFIX, SimulatorClient
from llm_simulator.faults import Simulator
from llm_simulator.options import OptionError, SimulatorOptions
from llm_simulator.server import loopback_host, run, serve

__all__ = [
    "READY_PREFIX",
    "OptionError",
    "Simulator",
    "SimulatorClient",
    "SimulatorOptions",
    "compose_answer",
    "describe_transcript",
    "loopback_host",
    "run",
    "serve",
]
