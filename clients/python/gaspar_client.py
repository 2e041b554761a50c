"""A client for gaspard and for gaspar, the Python daemon it rebuilds.

One request per connection: the message's length as 4 bytes, unsigned and
big-endian, then the message; the reply is every byte the daemon sends before
it closes the connection. A request that failed ends with a connection reset
instead, raised here as :class:`Reset`.

    >>> import gaspar_client
    >>> gaspar_client.request("127.0.0.1:10123", b"hello")      # doctest: +SKIP
    b'hello'
    >>> gaspar_client.pack(b"hello")
    b'\\x00\\x00\\x00\\x05hello'

:func:`request` and :func:`pack` mean what ``gaspar.client.request`` and
``gaspar.client.pack`` mean. :func:`request` uses the plain :mod:`socket`
module, looked up when it is called, so eventlet's or gevent's monkey patching
makes it cooperative. :func:`request_async` is the same for :mod:`asyncio`.

This module has no dependencies and runs on Python 3.8 and later.
"""

import errno
import socket
import struct
import time

__all__ = [
    "request",
    "request_async",
    "pack",
    "Error",
    "Reset",
    "Timeout",
    "Refused",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "MAX_MESSAGE_LEN",
]

__version__ = "0.1.0"

#: The port gaspard (and gaspar's examples) listen on unless told otherwise.
DEFAULT_PORT = 10123

#: Seconds the exchange may take once connected, unless told otherwise.
DEFAULT_TIMEOUT = 60.0

#: Seconds to wait for the connection, unless told otherwise.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: The largest message the 4-byte header can announce (4 GiB - 1). The
#: daemon's own limit (``--max-request-size``, 64 MiB by default) is usually
#: lower; a request over it is reset.
MAX_MESSAGE_LEN = 0xFFFFFFFF

_HEADER = struct.Struct("!I")
_CHUNK = 65536


class Error(OSError):
    """The request got no reply: the base of :class:`Reset`, :class:`Timeout`
    and :class:`Refused`.

    ``address`` is the daemon's address as ``"host:port"``. Other failures
    (a name that does not resolve, an unreachable network) are raised as the
    :class:`OSError` the socket raised.
    """

    address = None


class Reset(Error, ConnectionResetError):
    """The daemon reset the connection: the request failed.

    The handler raised or returned an error, its worker crashed, the request
    ran past the daemon's ``--timeout`` or over its ``--max-request-size``, or
    the queue was full. The reset carries no reason; the daemon's log has it.
    Also a :class:`ConnectionResetError`, which code written for gaspar may
    already catch.
    """


class Timeout(Error, TimeoutError):
    """No connection within ``connect_timeout``, or no whole reply within
    ``timeout``. Also a :class:`TimeoutError` (``socket.timeout``)."""

    #: ``"connect"``, ``"send"`` or ``"reply"``: what the client waited for.
    stage = None


class Refused(Error, ConnectionRefusedError):
    """The connection was refused: nothing listens on that address. Also a
    :class:`ConnectionRefusedError`."""


def pack(message):
    """Returns ``message`` framed as a request: its length as 4 bytes,
    unsigned and big-endian, then the message.

    For sending requests through other means (an event loop's own streams, a
    file for ``nc``). ``message`` is bytes-like, or a str, sent as UTF-8.

    >>> pack(b"\\x00\\xff")
    b'\\x00\\x00\\x00\\x02\\x00\\xff'
    >>> pack("é")
    b'\\x00\\x00\\x00\\x02\\xc3\\xa9'

    Raises :class:`ValueError` for a message longer than
    :data:`MAX_MESSAGE_LEN`, :class:`TypeError` for one that is not bytes.
    """
    if isinstance(message, str):
        message = message.encode("utf-8")
    elif not isinstance(message, bytes):
        try:
            message = bytes(memoryview(message))
        except TypeError:
            raise TypeError(
                "a gaspar message is bytes or str, not %s" % type(message).__name__
            ) from None
    if len(message) > MAX_MESSAGE_LEN:
        raise ValueError(
            "a message of %d bytes is over the protocol's limit of %d bytes"
            % (len(message), MAX_MESSAGE_LEN)
        )
    return _HEADER.pack(len(message)) + message


def request(
    address, message, timeout=DEFAULT_TIMEOUT, connect_timeout=DEFAULT_CONNECT_TIMEOUT
):
    """Sends ``message`` to the daemon at ``address`` and returns the reply.

    ``address`` is ``"host:port"`` (``"[::1]:10123"`` for IPv6) or a
    ``(host, port)`` tuple. ``message`` is bytes-like, or a str, sent as UTF-8.
    The reply is :class:`bytes`, and may be empty: a handler may return
    nothing, and an empty message is closed without a reply.

    ``connect_timeout`` is how many seconds to wait for the connection (for
    each address the name resolves to). ``timeout`` is how many seconds the
    whole exchange may take once connected: sending the request, waiting in
    the daemon's queue, and receiving the whole reply. It is a deadline, not
    a limit on each read. ``None`` waits as long as it takes; ``0`` times out
    at once. When it passes, the connection is closed: gaspard drops the
    request if it was still queued, or discards its reply.

    Raises :class:`Reset` if the request failed, :class:`Timeout`,
    :class:`Refused`, or the :class:`OSError` the socket raised (for instance
    :class:`socket.gaierror` for a name that does not resolve).
    """
    frame = pack(message)
    host, port = _split(address)
    where = _where(host, port)
    if connect_timeout is not None and connect_timeout <= 0:
        raise _timeout(where, "connect")
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except ConnectionRefusedError as e:
        raise _refused(where) from e
    except (socket.timeout, TimeoutError) as e:
        raise _timeout(where, "connect") from e
    deadline = None if timeout is None else time.monotonic() + timeout
    stage = "send"
    try:
        sock.settimeout(_left(deadline, where, stage))
        sock.sendall(frame)
        stage = "reply"
        chunks = []
        while True:
            sock.settimeout(_left(deadline, where, stage))
            chunk = sock.recv(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except Error:
        raise
    except (socket.timeout, TimeoutError) as e:
        raise _timeout(where, stage) from e
    except ConnectionResetError as e:
        raise _reset(where) from e
    except (BrokenPipeError, ConnectionAbortedError) as e:
        # A reset while the request is still being sent (after an oversize
        # header, say) makes the send fail with EPIPE: gaspard never closes
        # cleanly before it has read the whole request.
        if stage == "send":
            raise _reset(where) from e
        raise
    finally:
        sock.close()


async def request_async(
    address, message, timeout=DEFAULT_TIMEOUT, connect_timeout=DEFAULT_CONNECT_TIMEOUT
):
    """:func:`request` for :mod:`asyncio`: the same arguments, reply and
    exceptions, without blocking the event loop.

    >>> reply = await request_async("127.0.0.1:10123", b"hello")  # doctest: +SKIP
    """
    import asyncio

    frame = pack(message)
    host, port = _split(address)
    where = _where(host, port)
    reader, writer = await _open_async(asyncio, host, port, connect_timeout, where)
    stage = ["send"]

    async def exchange():
        writer.write(frame)
        await writer.drain()
        stage[0] = "reply"
        return await reader.read()

    try:
        if timeout is None:
            return await exchange()
        if timeout <= 0:
            raise _timeout(where, "send")
        try:
            return await asyncio.wait_for(exchange(), timeout)
        except asyncio.TimeoutError as e:
            raise _timeout(where, stage[0]) from e
    except Error:
        raise
    except ConnectionResetError as e:
        raise _reset(where) from e
    except (BrokenPipeError, ConnectionAbortedError) as e:
        if stage[0] == "send":
            raise _reset(where) from e
        raise
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:
            pass  # the outcome is already decided


async def _open_async(asyncio, host, port, connect_timeout, where):
    """Connects to the first address ``host`` resolves to that accepts, each
    within ``connect_timeout``, as :func:`socket.create_connection` does."""
    if connect_timeout is not None and connect_timeout <= 0:
        raise _timeout(where, "connect")
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    failure = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            connecting = loop.sock_connect(sock, sockaddr)
            if connect_timeout is None:
                await connecting
            else:
                await asyncio.wait_for(connecting, connect_timeout)
        except asyncio.TimeoutError as e:
            sock.close()
            failure = _timeout(where, "connect")
            failure.__cause__ = e
            continue
        except ConnectionRefusedError as e:
            sock.close()
            failure = _refused(where)
            failure.__cause__ = e
            continue
        except OSError as e:
            sock.close()
            failure = e
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)
    if failure is None:
        raise OSError("%s resolved to no address" % host)
    raise failure


def _split(address):
    """``(host, port)`` from ``"host:port"``, ``"[v6]:port"`` or a tuple."""
    if isinstance(address, (tuple, list)) and len(address) == 2:
        host, port = address
    elif isinstance(address, str):
        if address.startswith("["):
            host, _, rest = address[1:].partition("]")
            if not rest.startswith(":"):
                raise ValueError("expected '[host]:port', not %r" % address)
            port = rest[1:]
        else:
            host, colon, port = address.rpartition(":")
            if not colon:
                raise ValueError("expected 'host:port', not %r" % address)
    else:
        raise TypeError(
            "an address is 'host:port' or (host, port), not %r" % (address,)
        )
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError("%r is not a port number in %r" % (port, address)) from None
    if not 0 < port < 65536:
        raise ValueError("port %d is out of range in %r" % (port, address))
    return str(host), port


def _where(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _left(deadline, where, stage):
    """Seconds left before ``deadline`` as a socket timeout (``None``: no
    deadline); raises :class:`Timeout` once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout(where, stage)
    return left


def _reset(where):
    error = Reset(
        errno.ECONNRESET,
        "%s reset the connection: the request failed (the daemon's log says why)"
        % where,
    )
    error.address = where
    return error


def _timeout(where, stage):
    text = {
        "connect": "timed out connecting to %s",
        "send": "timed out sending the request to %s",
        "reply": "timed out waiting for the reply from %s",
    }[stage]
    error = Timeout(errno.ETIMEDOUT, text % where)
    error.address = where
    error.stage = stage
    return error


def _refused(where):
    error = Refused(
        errno.ECONNREFUSED,
        "%s refused the connection: nothing is listening there" % where,
    )
    error.address = where
    return error
