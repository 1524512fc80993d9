"""Download formats of a job's properties, chosen with `?format=` or the
Accept header. The view streams the body itself; `render` only serves
error bodies."""

import json

from rest_framework.renderers import BaseRenderer

from ..exports import CONTENT_TYPES


class _DownloadRenderer(BaseRenderer):
    charset = None

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return json.dumps(data, default=str).encode()


class JSONLRenderer(_DownloadRenderer):
    media_type = CONTENT_TYPES["jsonl"]
    format = "jsonl"


class CSVRenderer(_DownloadRenderer):
    media_type = "text/csv"
    format = "csv"


class ParquetRenderer(_DownloadRenderer):
    media_type = CONTENT_TYPES["parquet"]
    format = "parquet"


DOWNLOAD_FORMATS = ("jsonl", "csv", "parquet")
