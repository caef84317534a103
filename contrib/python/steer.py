"""Steer worker helper for Python: standard library only, Python 3.8 or newer.

Under ``steer run -- python3 app.py`` each worker process gets one socket per listener
as fds 3, 4, ... (systemd socket activation: ``LISTEN_FDS``, ``LISTEN_FDNAMES``) and the
primary's IPC channel at ``STEER_IPC_FD``: a Unix stream socket carrying one JSON object
a line (docs/ipc.md). This module speaks it:

- ``listeners()`` names each inherited socket and says what it is (TCP or UDP).
- ``Worker`` reads the environment, holds the sockets and the channel, answers pings,
  relays messages between workers (``send(to, data)``, ``on_message``) and turns SIGTERM,
  the primary's ``drain`` message and a gone primary into one ``on_drain`` event.
  Call ``worker.handle_ipc()`` from your event loop when the channel is readable
  (``worker.register(selector)``, ``worker.attach_asyncio(loop)``): the pong then comes
  from the loop itself, so a loop that stalls stops answering and Steer replaces the
  worker. Never answer from a timer thread; that hides exactly the failure the heartbeat
  is for.
- ``LoadRecord`` is the worker's own load record under ``--balance least-loaded``
  (``STEER_LOAD_FD``): ``worker.publish_load()`` stores the ``accepted`` and ``active``
  counters there, two stores into shared memory, and ``HTTPServer`` calls it on every
  accept and close.
- ``HTTPServer`` is ``http.server`` on that socket with a drain that loses nothing:
  stop accepting (queued connections move to the other workers), answer keep-alive
  requests with ``Connection: close``, close connections still idle after a grace, and
  return from ``serve()`` once the last connection is done.
- UDP: ``worker.on_datagram(callback)`` answers the datagrams of a UDP listener from the
  same loop (``HTTPServer.serve()``, or ``worker.serve_datagrams()`` with no HTTP). On
  drain each UDP socket is read until it is empty, every datagram handed to its callback,
  then closed: the primary took it out of steering before the drain, so what is queued
  there is all that will come, and a datagram left in a closed socket is lost.

Under Steer, ``Worker()`` ignores the primary's control signals (SIGHUP, SIGUSR1, SIGUSR2,
SIGTTIN, SIGTTOU, SIGWINCH) that the application has not taken itself, so that a signal
sent to every process of the service (``systemctl kill`` without ``--kill-whom=main``)
reaches only the primary's meaning. SIGTERM still drains.
"""

import collections
import errno
import http.server
import json
import mmap
import os
import selectors
import signal
import socket
import socketserver
import struct
import threading
import time

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
# Most bytes kept for a primary that does not read: four largest messages.
OUTBOX_LIMIT = 4 * (MAX_MESSAGE_BYTES + 1)
LISTEN_FD = 3
DEFAULT_GRACE = 2.0
# Migrated connections raise no event on the listener: look at its queue this often.
ACCEPT_POLL = 0.05
# Datagrams read from one UDP socket per turn of the loop (a drain reads them all).
DATAGRAM_BUDGET = 256
# The largest UDP payload.
LARGEST_DATAGRAM = 65535
# What the primary does on these, a worker must not do too (see the module's doc).
CONTROL_SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGTTIN", "SIGTTOU", "SIGWINCH")


class PrimaryGone(Exception):
    """The primary closed the channel: nobody supervises this process any more."""


class Channel:
    """The IPC stream, non-blocking: JSON lines in, JSON lines out.

    What the socket does not take waits in a bounded buffer and goes out with the next
    ``send`` or ``flush``; a message that does not fit is dropped whole and counted in
    ``dropped``, so the primary never sees half a line.
    """

    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self._in = bytearray()
        self._out = bytearray()
        # Handler threads send too (``Worker.send``): the outbox is one thread's at a time,
        # or a send appends while another thread's socket write holds the buffer.
        self._out_lock = threading.RLock()
        self.dropped = 0

    def fileno(self):
        return self.sock.fileno()

    def send(self, message):
        """Sends one message (``v`` is added); False if it was refused, being over
        ``MAX_MESSAGE_BYTES`` as a line (the primary would replace a worker that wrote
        it), or dropped."""
        message = dict(message, v=PROTOCOL_VERSION)
        line = json.dumps(message, separators=(",", ":")).encode()
        if len(line) > MAX_MESSAGE_BYTES:
            return False
        with self._out_lock:
            if len(self._out) + len(line) + 1 > OUTBOX_LIMIT:
                self.flush()
                if len(self._out) + len(line) + 1 > OUTBOX_LIMIT:
                    self.dropped += 1
                    return False
            self._out += line + b"\n"
            self.flush()
            return True

    def flush(self):
        """Writes what waits, as far as the socket takes it."""
        with self._out_lock:
            while self._out:
                try:
                    sent = self.sock.send(self._out)
                except (BlockingIOError, InterruptedError):
                    return
                except (BrokenPipeError, ConnectionResetError) as err:
                    raise PrimaryGone() from err
                del self._out[:sent]

    def receive(self):
        """Every complete message queued now (a list, maybe empty)."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError as err:
                raise PrimaryGone() from err
            if not chunk:
                raise PrimaryGone()
            self._in += chunk
        *lines, rest = self._in.split(b"\n")
        if len(rest) > MAX_MESSAGE_BYTES:
            raise ValueError("an IPC line longer than the message limit")
        self._in = bytearray(rest)
        return [json.loads(line) for line in lines if line]


def activated():
    """Whether Steer (or systemd) handed this process sockets as fds 3, 4, ...:
    ``LISTEN_FDS`` of at least 1 and ``LISTEN_PID`` naming this process."""
    count = os.environ.get("LISTEN_FDS", "")
    return count.isdigit() and int(count) >= 1 and os.environ.get("LISTEN_PID") == str(os.getpid())


Listener = collections.namedtuple("Listener", "name kind family fd")
Listener.__doc__ = """One inherited socket: ``name`` from ``LISTEN_FDNAMES`` (``--listen
NAME=...``; ``unknown`` when unset), ``kind`` ``"tcp"`` (listening) or ``"udp"`` (bound), or
None for anything else, ``family`` ``socket.AF_INET`` or ``AF_INET6``, and ``fd``."""


def listeners():
    """The sockets Steer (or systemd) passed to this process, in order, as ``Listener``s;
    empty when it was given none. Only looks: ``Worker()`` takes them."""
    if not activated():
        return []
    count = int(os.environ["LISTEN_FDS"])
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != count:
        names = ["unknown"] * count
    found = []
    for place, name in enumerate(names):
        fd = LISTEN_FD + place
        try:
            copy = socket.socket(fileno=os.dup(fd))
        except OSError:
            found.append(Listener(name, None, None, fd))
            continue
        with copy:
            kind = None
            if copy.type == socket.SOCK_DGRAM:
                kind = "udp"
            elif copy.type == socket.SOCK_STREAM and copy.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                kind = "tcp"
            found.append(Listener(name, kind, copy.family, fd))
    return found


def drain_datagrams(sock, callback):
    """Reads every datagram queued on ``sock`` until none is left (``recvfrom`` until
    ``BlockingIOError``; it never waits), calling ``callback(data, address, sock)`` for
    each, and returns how many. Call it on drain, then close the socket."""
    return _read_datagrams(sock, callback, None, None)


def _read_datagrams(sock, callback, budget, until):
    """Reads and hands over at most ``budget`` datagrams, and none after the monotonic
    time ``until`` (None: no bound); returns the count."""
    sock.setblocking(False)
    read = 0
    while (budget is None or read < budget) and (until is None or time.monotonic() < until):
        try:
            data, address = sock.recvfrom(LARGEST_DATAGRAM)
        except BlockingIOError:
            break
        except ConnectionRefusedError:
            continue  # an ICMP error of an earlier answer, reported here
        read += 1
        callback(data, address, sock)
    return read


def _int_env(name):
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


class LoadRecord:
    """This worker's own load record (``--balance least-loaded``; docs/ipc.md).

    The map behind ``STEER_LOAD_FD`` holds this process's record and nothing else; the
    fields are native-endian u64s at the offsets ``STEER_LOAD_LAYOUT`` names. The worker
    writes ``accepted`` and ``active``; the program and the primary write the others.
    """

    def __init__(self, fd, layout):
        self._memory = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        offsets = dict(field.split(":") for field in layout.split(","))
        self._accepted = int(offsets["accepted"])
        self._active = int(offsets["active"])

    @classmethod
    def from_env(cls):
        """The record Steer passed, or None (another policy, or not under Steer)."""
        fd = _int_env("STEER_LOAD_FD")
        layout = os.environ.get("STEER_LOAD_LAYOUT")
        return cls(fd, layout) if fd is not None and layout else None

    def publish(self, accepted, active):
        struct.pack_into("=Q", self._memory, self._accepted, accepted)
        struct.pack_into("=Q", self._memory, self._active, active)


class Worker:
    """One worker process's link to its primary.

    ``slot`` (0..N-1, stable across restarts), ``generation`` and ``id`` come from the
    environment (None without Steer). ``sockets`` holds every inherited socket by name
    (``socket.socket(fileno=fd)``, family and type as inherited); ``listener`` is the
    first TCP one, or None.
    ``counters`` (``accepted``, ``active``, ``requests``) travel with every pong and show
    per slot in ``steer status``.
    """

    def __init__(self):
        self.slot = _int_env("STEER_WORKER_SLOT")
        self.generation = _int_env("STEER_WORKER_GENERATION")
        self.id = _int_env("STEER_WORKER_ID")
        self.sockets = {}
        for inherited in listeners():
            self.sockets[inherited.name] = socket.socket(fileno=inherited.fd)
        self.listener = next(
            (sock for sock in self.sockets.values() if sock.type == socket.SOCK_STREAM), None
        )
        # UDP sockets served by ``on_datagram``: socket -> callback.
        self._datagram_callbacks = {}
        ipc_fd = _int_env("STEER_IPC_FD")
        self.channel = Channel(ipc_fd) if ipc_fd is not None else None
        self.counters = {"accepted": 0, "active": 0, "requests": 0}
        self.load = LoadRecord.from_env()
        self.draining = False
        self._message_callbacks = []
        self._drain_callbacks = []
        self._lock = threading.Lock()
        if self.listener is not None or self.channel is not None:
            _ignore_control_signals()

    def on_message(self, callback):
        """``callback(data, from_slot)`` for each message from another worker (or the
        primary, with ``from_slot`` None). Runs inside ``handle_ipc``."""
        self._message_callbacks.append(callback)
        return callback

    def udp_socket(self, name=None):
        """The inherited UDP socket named ``name`` (default: the first UDP one), or None."""
        for sock_name, sock in self.sockets.items():
            if sock.type == socket.SOCK_DGRAM and name in (None, sock_name):
                return sock
        return None

    def on_datagram(self, callback, name=None, sock=None):
        """Serves a UDP listener: ``callback(data, address, sock)`` for each datagram of
        the inherited UDP socket named ``name`` (default: the first), or of ``sock``;
        answer with ``sock.sendto(reply, address)``. Read from the loop
        (``HTTPServer.serve``, ``serve_datagrams``, or ``register`` in your own); on drain
        read until empty, then closed. Returns the socket."""
        sock = sock if sock is not None else self.udp_socket(name)
        if sock is None:
            raise LookupError(f"no inherited UDP socket named {name!r}" if name else "no inherited UDP socket")
        sock.setblocking(False)
        self._datagram_callbacks[sock] = callback
        return sock

    def handle_datagrams(self, sock):
        """Answers what is queued on ``sock``: at most ``DATAGRAM_BUDGET`` datagrams, and
        for no longer than ``ACCEPT_POLL``, so that pings and connections get their turn
        under a slow callback. Call it when the socket is readable (``register`` does;
        ``selectors`` is level-triggered, so what is left wakes the loop again)."""
        callback = self._datagram_callbacks.get(sock)
        if callback is not None:
            _read_datagrams(sock, callback, DATAGRAM_BUDGET, time.monotonic() + ACCEPT_POLL)

    def drain_datagrams(self):
        """Reads every UDP socket given to ``on_datagram`` until it is empty, handing each
        datagram to its callback, then closes it. Returns how many datagrams were read.
        ``HTTPServer.serve`` and ``serve_datagrams`` call it on drain."""
        read = 0
        for sock, callback in list(self._datagram_callbacks.items()):
            read += drain_datagrams(sock, callback)
            sock.close()
        self._datagram_callbacks.clear()
        return read

    def serve_datagrams(self):
        """A loop for a worker with UDP listeners only: answers pings and datagrams until
        the drain, then drains the datagrams and returns."""
        with selectors.DefaultSelector() as selector:
            self.register(selector)
            self.ready()
            while not self.draining:
                for key, _ in selector.select(timeout=ACCEPT_POLL):
                    key.data()
            for sock in self._datagram_callbacks:
                selector.unregister(sock)
            self.drain_datagrams()

    def on_drain(self, callback):
        """``callback(why)`` once, when the worker is asked to drain."""
        self._drain_callbacks.append(callback)
        return callback

    def send(self, to, data):
        """Sends ``data`` (anything JSON can hold) to ``"all"`` other workers, one slot
        (an int), or ``"primary"``. False, and nothing sent, if there is no channel, the
        message is over 65,536 bytes as a JSON line, or the outbox is full."""
        if to in ("all", "primary"):
            recipient = to
        elif isinstance(to, int) and to >= 0:
            recipient = {"slot": to}
        else:
            raise ValueError(f'to must be "all", "primary" or a slot number, not {to!r}')
        return self._send({"type": "user", "to": recipient, "data": data})

    def publish_load(self):
        """Stores ``counters["accepted"]`` and ``["active"]`` in this worker's load record
        (``least-loaded``). Call it on every accept and close; it stops once draining,
        when the record is no longer read."""
        if self.load is not None and not self.draining:
            self.load.publish(self.counters["accepted"], self.counters["active"])

    def ready(self):
        """Tells the primary the loop runs and answers pings. Call it once serving."""
        self._send({"type": "ready", "heartbeats": True})

    def handle_ipc(self):
        """Reads what the primary sent and acts on it. Call it from your event loop when
        the channel is readable: pings are answered right here."""
        if self.channel is None:
            return
        try:
            self.channel.flush()
            messages = self.channel.receive()
        except PrimaryGone:
            self.channel = None
            self.drain("the primary is gone")
            return
        for message in messages:
            kind = message.get("type")
            if kind == "ping":
                self._send({"type": "pong", "seq": message["seq"], "counters": dict(self.counters)})
            elif kind == "drain":
                self.drain("drain message")
            elif kind == "user":
                for callback in self._message_callbacks:
                    callback(message.get("data"), message.get("from"))

    def drain(self, why="drain"):
        """Starts the drain once, whoever asks."""
        with self._lock:
            if self.draining:
                return
            self.draining = True
        for callback in self._drain_callbacks:
            callback(why)

    def handle_sigterm(self):
        """SIGTERM (what Steer sends an external worker to drain) starts the drain."""
        signal.signal(signal.SIGTERM, lambda *_: self.drain("SIGTERM"))

    def register(self, selector):
        """Adds the channel to a ``selectors`` loop, with ``handle_ipc`` as its data, and
        each UDP socket of ``on_datagram`` with a call to ``handle_datagrams``. Call the
        data of each ready key."""
        if self.channel is not None:
            selector.register(self.channel, selectors.EVENT_READ, self.handle_ipc)
        for sock in self._datagram_callbacks:
            selector.register(sock, selectors.EVENT_READ, lambda sock=sock: self.handle_datagrams(sock))

    def attach_asyncio(self, loop):
        """Answers pings from an asyncio loop (uvicorn's, aiohttp's ...)."""
        if self.channel is not None:
            loop.add_reader(self.channel.fileno(), self.handle_ipc)

    def _send(self, message):
        if self.channel is None:
            return False
        try:
            return self.channel.send(message)
        except PrimaryGone:
            self.channel = None
            self.drain("the primary is gone")
            return False


def _ignore_control_signals():
    """SIG_IGN for each control signal still at its default (one the application took
    is left alone). Only the main thread may set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in CONTROL_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) == signal.SIG_DFL:
            signal.signal(number, signal.SIG_IGN)


class DrainingHandler(http.server.BaseHTTPRequestHandler):
    """An ``http.server`` handler for ``HTTPServer``: HTTP/1.1 keep-alive, and
    ``Connection: close`` on every response once the worker drains. Subclass it and write
    ``do_GET`` and friends as usual."""

    protocol_version = "HTTP/1.1"
    # http.server writes the headers and the body separately. With Nagle's algorithm the
    # body then waits for the client's delayed ACK of the headers, about 40 ms on Linux:
    # each keep-alive request would cost that. (A closing connection flushes at once.)
    disable_nagle_algorithm = True

    def setup(self):
        super().setup()
        self.server._track(self.connection, busy=False)

    def parse_request(self):
        # Called once the request line has arrived: the connection is busy from here.
        self.server._track(self.connection, busy=True)
        self.server.worker.counters["requests"] += 1
        return super().parse_request()

    def end_headers(self):
        if self.server.worker.draining:
            self.send_header("Connection", "close")
        super().end_headers()

    def handle_one_request(self):
        super().handle_one_request()
        self.server._track(self.connection, busy=False)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server._untrack(self.connection)


class HTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A threaded ``http.server`` on the worker's first inherited TCP socket, with Steer's
    drain.

    ``serve()`` runs the loop: it accepts, answers the primary's pings and the datagrams
    of ``worker.on_datagram``, and on drain stops accepting, answers every datagram queued
    on the UDP sockets and closes them, tells keep-alive clients to close, closes
    connections idle after ``grace`` seconds, and returns when none is left. Without Steer
    it listens on ``address``.
    """

    daemon_threads = True

    def __init__(self, handler_class, worker=None, grace=DEFAULT_GRACE, address=("127.0.0.1", 8000)):
        self.worker = worker or Worker()
        self.grace = grace
        self._connections = {}
        self._connections_lock = threading.Lock()
        inherited = self.worker.listener
        super().__init__(address, handler_class, bind_and_activate=inherited is None)
        if inherited is not None:
            self.socket.close()
            self.socket = inherited
        self.socket.setblocking(False)

    def _track(self, conn, busy):
        with self._connections_lock:
            if conn not in self._connections:
                self.worker.counters["accepted"] += 1
                self.worker.counters["active"] += 1
                self.worker.publish_load()
            self._connections[conn] = busy

    def _untrack(self, conn):
        with self._connections_lock:
            if self._connections.pop(conn, None) is not None:
                self.worker.counters["active"] -= 1
                self.worker.publish_load()

    def _close_idle(self):
        with self._connections_lock:
            idle = [conn for conn, busy in self._connections.items() if not busy]
        for conn in idle:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def serve(self):
        """Serves until drained. Returns when the last connection is done."""
        worker = self.worker
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ, None)
            worker.register(selector)
            worker.ready()
            idle_deadline = None
            while True:
                for key, _ in selector.select(timeout=ACCEPT_POLL):
                    if key.data is not None:
                        key.data()
                if not worker.draining:
                    self._accept_queued()
                    continue
                if idle_deadline is None:
                    # Closing the listener hands its queue to the other workers.
                    selector.unregister(self.socket)
                    self.socket.close()
                    # Nothing new reaches the UDP sockets now: answer what they hold.
                    for sock in list(worker._datagram_callbacks):
                        selector.unregister(sock)
                    worker.drain_datagrams()
                    idle_deadline = time.monotonic() + self.grace
                if time.monotonic() >= idle_deadline:
                    self._close_idle()
                with self._connections_lock:
                    if not self._connections:
                        return

    def _accept_queued(self):
        while True:
            try:
                conn, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # EINVAL: the primary shut a hung worker's listener down; serve what is open.
                if err.errno in (errno.EINVAL, errno.EBADF):
                    self.worker.drain("listener shut down")
                return
            conn.setblocking(True)
            self.process_request(conn, address)
