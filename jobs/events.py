"""Structured logs: one JSON line per job and row event, each with its job
id, for log pipelines to index (`jq 'select(.job_id == "…")'`)."""

import json
import logging
import uuid
from datetime import UTC, datetime

log = logging.getLogger("stringsight.events")


def log_event(event: str, **fields) -> None:
    log.info(event, extra={"event_fields": {"event": event, **fields}})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        line.update(getattr(record, "event_fields", None) or {"message": record.getMessage()})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=_plain, ensure_ascii=False)


def _plain(value):
    if isinstance(value, uuid.UUID | datetime):
        return str(value)
    return repr(value)
