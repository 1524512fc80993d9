"""The web server as the Procfile runs it is not stalled by clients that
never finish their headers (issue 19: a sync worker gives itself to one
such connection until its timeout, so a few of them leave /healthz
unanswered)."""

import socket

import pytest


@pytest.mark.e2e
def test_connections_that_never_finish_their_headers_do_not_stall_the_server(web_server):
    server = web_server()
    stalled = []
    # More than the Procfile's default number of web processes, each of which
    # a sync worker would give to one stalled connection.
    for _ in range(4):
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        stalled.append(connection)
    try:
        # A sync worker holds a stalled connection until its timeout:
        # with one each, these requests would time out.
        answers = [server.request("GET", "/healthz", timeout=30)[0] for _ in range(5)]
    finally:
        for connection in stalled:
            connection.close()

    assert answers == [200] * 5
