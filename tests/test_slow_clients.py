"""The web server as the Procfile runs it is not stalled by clients that
never finish their headers (issue 19: with sync workers, two such
connections held /healthz for 22 s)."""

import socket

import pytest


@pytest.mark.e2e
def test_connections_that_never_finish_their_headers_do_not_stall_the_server(web_server):
    server = web_server()
    stalled = []
    # Four: as many as the Procfile used to run sync workers (two stalled two).
    for _ in range(4):
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        stalled.append(connection)
    try:
        # A sync worker holds a stalled connection until its timeout (120 s):
        # with one each, these requests would time out.
        answers = [server.request("GET", "/healthz", timeout=30)[0] for _ in range(5)]
    finally:
        for connection in stalled:
            connection.close()

    assert answers == [200] * 5
