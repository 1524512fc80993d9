"""Download formats of a job's properties, chosen with `?format=` or the
Accept header. The view streams the body itself; `render` only serves
error bodies."""

import json

from rest_framework.negotiation import DefaultContentNegotiation
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


class ExplicitFormatFirst(DefaultContentNegotiation):
    """An explicit `?format=` wins over the Accept header: it names the
    download the caller wants, where an Accept header is often a client
    library's default (`application/json`). An unknown format raises
    Http404, which the view answers as a 400 naming the parameter."""

    def select_renderer(self, request, renderers, format_suffix=None):
        named = format_suffix or request.query_params.get(self.settings.URL_FORMAT_OVERRIDE)
        if named:
            renderer = self.filter_renderers(renderers, named)[0]
            return renderer, renderer.media_type
        return super().select_renderer(request, renderers, format_suffix)
