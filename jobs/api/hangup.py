"""Whether the client of a WSGI request has hung up, for a view that waits
a long time (an LLM call) and should stop once nobody waits for its answer.

WSGI gives no notice of a closed connection; the socket does: it reads as
ready, and a peek at it finds the end of the stream rather than bytes."""

import select
import socket
import ssl


def client_socket(environ: dict) -> socket.socket | None:
    """The request's connection, or None when it cannot be found (then only
    a timeout bounds the wait). gunicorn names it. Django's runserver and
    its test server (wsgiref) hide it behind `wsgi.input`: a LimitedStream
    that keeps only the read method of the handler's buffered socket file."""
    found = environ.get("gunicorn.socket")
    if found is None:
        reader = getattr(getattr(environ.get("wsgi.input"), "_read", None), "__self__", None)
        found = getattr(getattr(reader, "raw", None), "_sock", None)
    # A TLS socket cannot be peeked at without reading its records.
    if isinstance(found, socket.socket) and not isinstance(found, ssl.SSLSocket):
        return found
    return None


def hung_up(sock: socket.socket) -> bool:
    """True once the client has closed the connection (or it broke). Bytes
    waiting to be read, such as a pipelined next request, mean it is still
    there; they are only peeked at, never taken."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset by the peer, or already closed here
        return True
