"""Finding a WSGI request's connection and telling whether its client has
hung up (jobs/api/hangup.py). The end-to-end case, a live server and a
client that closes its socket, is in test_extract_single.py."""

import io
import socket

import pytest
from django.core.handlers.wsgi import LimitedStream

from jobs.api.hangup import client_socket, hung_up


@pytest.fixture
def connection():
    server_side, client_side = socket.socketpair()
    yield server_side, client_side
    server_side.close()
    client_side.close()


def test_gunicorns_socket_is_found(connection):
    server_side, _ = connection

    assert client_socket({"gunicorn.socket": server_side, "wsgi.input": io.BytesIO()}) is server_side


def test_wsgirefs_socket_is_found_behind_the_limited_stream(connection):
    # As Django's runserver builds it: a LimitedStream over the handler's
    # buffered socket file.
    server_side, _ = connection
    rfile = server_side.makefile("rb")

    found = client_socket({"wsgi.input": LimitedStream(rfile, 10)})

    rfile.close()
    assert found is server_side


@pytest.mark.parametrize("stream", [io.BytesIO(b"{}"), LimitedStream(io.BytesIO(b"{}"), 2), None])
def test_no_socket_is_found_where_there_is_none(stream):
    assert client_socket({"wsgi.input": stream}) is None


def test_a_connected_client_has_not_hung_up_even_with_bytes_waiting(connection):
    server_side, client_side = connection

    quiet = hung_up(server_side)
    client_side.sendall(b"GET /next HTTP/1.1\r\n")  # a pipelined next request
    with_bytes = hung_up(server_side)

    assert (quiet, with_bytes) == (False, False)
    assert server_side.recv(100) == b"GET /next HTTP/1.1\r\n"  # peeked at, never taken


def test_a_client_that_closed_its_end_has_hung_up(connection):
    server_side, client_side = connection

    client_side.close()

    assert hung_up(server_side) is True


def test_a_socket_closed_here_counts_as_hung_up(connection):
    server_side, _ = connection

    server_side.close()

    assert hung_up(server_side) is True
