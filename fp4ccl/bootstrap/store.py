"""The fp4ccl TCP store: a token-checked key/value rendezvous that moves raw bytes only.

Wire protocol (all integers big-endian):

    handshake   client -> b"F4CS" u8 version u16 token_len token
                server -> u8 status (0 ok, 1 wrong token, 2 bad magic/version); closes unless ok
    request     u8 op, then per op:
                  SET    key value          GET   key f64 timeout
                  ADD    key i64 delta      CHECK key
                  DELETE key                WAIT  u32 n, n*key, f64 timeout
    reply       u8 status (0 ok, 1 timeout, 2 error), then
                  ok: GET value | ADD i64 | CHECK u8 | DELETE u8 | SET, WAIT nothing
                  timeout: u32 n, n*key (the keys still missing)
                  error: u32 len, utf-8 message
    key = u32 len + utf-8, value = u64 len + bytes; a negative timeout waits forever.

Nothing received is ever deserialised beyond these fields; values stay opaque bytes.
"""
from __future__ import annotations

import hmac
import math
import socket
import struct
import threading
import time

__all__ = ["DEFAULT_TIMEOUT", "StoreServer", "StoreClient", "format_address", "parse_address"]

_MAGIC = b"F4CS"
_VERSION = 1
_OP_SET, _OP_GET, _OP_ADD, _OP_CHECK, _OP_DELETE, _OP_WAIT = range(1, 7)
_OK, _TIMEOUT, _ERROR = 0, 1, 2
_HS_OK, _HS_BAD_TOKEN, _HS_BAD_PROTOCOL = 0, 1, 2
# A key longer than this means the stream is out of sync (or not a store client); stop reading.
_MAX_KEY = 1 << 20
# An unauthenticated peer gets this long to finish the handshake, so idle sockets cannot pile up.
_HANDSHAKE_TIMEOUT = 10.0
# Extra client-side socket slack on top of a server-side wait, for network latency.
_NET_SLACK = 30.0
# A client's waits (connecting, lookups) when it is given no timeout.
DEFAULT_TIMEOUT = 300.0

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")
_F64 = struct.Struct("!d")


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port") into (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"store address must be 'host:port', got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """Join host and port, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _token_bytes(token) -> bytes:
    if isinstance(token, str):
        return token.encode("utf-8")
    if isinstance(token, (bytes, bytearray)):
        return bytes(token)
    raise TypeError(f"token must be str or bytes, got {type(token).__name__}")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k
    return bytes(buf)


def _enc_key(key: str) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"store key must be str, got {type(key).__name__}")
    raw = key.encode("utf-8")
    if len(raw) > _MAX_KEY:
        raise ValueError(f"store key is {len(raw)} bytes; the limit is {_MAX_KEY}")
    return _U32.pack(len(raw)) + raw


def _read_key(sock: socket.socket) -> str:
    (n,) = _U32.unpack(_recv_exact(sock, 4))
    if n > _MAX_KEY:
        raise ConnectionError(f"key length {n} exceeds {_MAX_KEY}: protocol out of sync")
    return _recv_exact(sock, n).decode("utf-8")


def _read_value(sock: socket.socket) -> bytes:
    (n,) = _U64.unpack(_recv_exact(sock, 8))
    return _recv_exact(sock, n)


def _wire_timeout(timeout) -> float:
    return -1.0 if timeout is None or math.isinf(timeout) else max(0.0, float(timeout))


class StoreServer:
    """Serves the key/value table to token-holding clients from daemon threads."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token="", backlog: int = 512):
        self._token = _token_bytes(token)
        self._data: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Lets a restarted job reuse a port still in TIME_WAIT; Linux still refuses a port someone listens on.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.host = host
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"fp4ccl-store-{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """The "host:port" clients connect to."""
        return format_address(self.host, self.port)

    def key_count(self) -> int:
        """How many keys the store holds now (what a job's exchanges leave behind)."""
        with self._cond:
            return len(self._data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"StoreServer({self.address}{', closed' if self._closed else ''})"

    def close(self) -> None:
        """Stop accepting, drop every connection and wake blocked waiters."""
        if self._closed:
            return
        self._closed = True
        try:
            # shutdown (not just close) is what wakes a thread blocked in accept() on Linux.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=2.0)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._handshake(conn):
                return
            while not self._closed:
                try:
                    op = conn.recv(1)
                except OSError:
                    return
                if not op:
                    return
                self._dispatch(conn, op[0])
        except (ConnectionError, OSError, UnicodeDecodeError, struct.error):
            pass
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        conn.settimeout(_HANDSHAKE_TIMEOUT)
        head = _recv_exact(conn, 7)
        if head[:4] != _MAGIC or head[4] != _VERSION:
            conn.sendall(_U8.pack(_HS_BAD_PROTOCOL))
            return False
        (n,) = _U16.unpack(head[5:7])
        offered = _recv_exact(conn, n)
        if not hmac.compare_digest(offered, self._token):
            conn.sendall(_U8.pack(_HS_BAD_TOKEN))
            return False
        conn.sendall(_U8.pack(_HS_OK))
        conn.settimeout(None)
        return True

    def _wait_for(self, keys: list[str], timeout: float) -> list[str]:
        """Block until every key exists (or timeout / close); return the keys still missing."""
        deadline = None if timeout < 0 else time.monotonic() + timeout
        with self._cond:
            while True:
                missing = [k for k in keys if k not in self._data]
                if not missing or self._closed:
                    return missing
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return missing
                    self._cond.wait(left)

    def _dispatch(self, conn: socket.socket, op: int) -> None:
        if op == _OP_SET:
            key = _read_key(conn)
            value = _read_value(conn)
            with self._cond:
                self._data[key] = value
                self._cond.notify_all()
            conn.sendall(_U8.pack(_OK))
        elif op == _OP_GET:
            key = _read_key(conn)
            (timeout,) = _F64.unpack(_recv_exact(conn, 8))
            missing = self._wait_for([key], timeout)
            if missing:
                if self._closed:
                    raise ConnectionError("store closed")
                conn.sendall(_U8.pack(_TIMEOUT) + _U32.pack(1) + _enc_key(key))
                return
            with self._cond:
                value = self._data.get(key)
            if value is None:  # deleted between the wake-up and the read: report as a timeout
                conn.sendall(_U8.pack(_TIMEOUT) + _U32.pack(1) + _enc_key(key))
                return
            conn.sendall(_U8.pack(_OK) + _U64.pack(len(value)))
            conn.sendall(value)
        elif op == _OP_ADD:
            key = _read_key(conn)
            (delta,) = _I64.unpack(_recv_exact(conn, 8))
            with self._cond:
                old = self._data.get(key, b"0")
                try:
                    new = int(old.decode("ascii")) + delta
                except (UnicodeDecodeError, ValueError):
                    msg = f"add({key!r}): the stored value is not a decimal integer"
                    raw = msg.encode()
                    conn.sendall(_U8.pack(_ERROR) + _U32.pack(len(raw)) + raw)
                    return
                if not -(1 << 63) <= new < (1 << 63):
                    raw = f"add({key!r}): result {new} overflows int64".encode()
                    conn.sendall(_U8.pack(_ERROR) + _U32.pack(len(raw)) + raw)
                    return
                self._data[key] = str(new).encode("ascii")
                self._cond.notify_all()
            conn.sendall(_U8.pack(_OK) + _I64.pack(new))
        elif op == _OP_CHECK:
            key = _read_key(conn)
            with self._cond:
                present = key in self._data
            conn.sendall(_U8.pack(_OK) + _U8.pack(present))
        elif op == _OP_DELETE:
            key = _read_key(conn)
            with self._cond:
                existed = self._data.pop(key, None) is not None
            conn.sendall(_U8.pack(_OK) + _U8.pack(existed))
        elif op == _OP_WAIT:
            (n,) = _U32.unpack(_recv_exact(conn, 4))
            keys = [_read_key(conn) for _ in range(n)]
            (timeout,) = _F64.unpack(_recv_exact(conn, 8))
            missing = self._wait_for(keys, timeout)
            if missing:
                if self._closed:
                    raise ConnectionError("store closed")
                conn.sendall(_U8.pack(_TIMEOUT) + _U32.pack(len(missing)) + b"".join(map(_enc_key, missing)))
                return
            conn.sendall(_U8.pack(_OK))
        else:
            raise ConnectionError(f"unknown store op {op}")


class StoreClient:
    """A thread-safe client: each call borrows an idle connection (opening one if all are busy)."""

    def __init__(self, address: str, token="", timeout: float = DEFAULT_TIMEOUT):
        self.address = address
        self.host, self.port = parse_address(address)
        self.timeout = float(timeout)
        self._token = _token_bytes(token)
        if len(self._token) > 0xFFFF:
            raise ValueError(f"token is {len(self._token)} bytes; the limit is 65535")
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        # Connect now so a wrong token or an absent server surfaces here, not on first use.
        self._idle.append(self._connect(self.timeout))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"StoreClient({self.address})"

    def _connect(self, timeout: float) -> socket.socket:
        # The server may not be up yet (another node, or a launcher still starting): retry until the deadline.
        deadline = time.monotonic() + timeout
        delay = 0.02
        last: Exception | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"could not connect to the fp4ccl store at {self.address} within "
                                   f"{timeout:g} s (last error: {last})")
            try:
                sock = socket.create_connection((self.host, self.port), timeout=min(left, 10.0))
            except OSError as e:
                last = e
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.5)
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(_MAGIC + _U8.pack(_VERSION) + _U16.pack(len(self._token)) + self._token)
                status = _recv_exact(sock, 1)[0]
            except (OSError, ConnectionError) as e:
                sock.close()
                last = e
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.5)
                continue
            if status == _HS_BAD_TOKEN:
                sock.close()
                raise PermissionError(f"the fp4ccl store at {self.address} rejected this job's token "
                                      f"(is FP4CCL_TOKEN the same on every node?)")
            if status != _HS_OK:
                sock.close()
                raise ConnectionError(f"{self.address} is not an fp4ccl store of protocol version {_VERSION}")
            sock.settimeout(None)
            return sock

    def _call(self, what: str, request: bytes, reader, wait: float | None = None, payload: bytes = b""):
        if self._closed:
            raise RuntimeError(f"StoreClient({self.address}) is closed")
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        if sock is None:
            sock = self._connect(self.timeout)
        healthy = False
        failure: Exception | None = None
        try:
            # A server-side wait gets network slack; everything else must answer within the client timeout.
            limit = self.timeout if wait is None else (math.inf if wait < 0 else wait + _NET_SLACK)
            sock.settimeout(None if math.isinf(limit) else limit)
            sock.sendall(request)
            if payload:
                sock.sendall(payload)
            status = _recv_exact(sock, 1)[0]
            if status == _OK:
                result = reader(sock)
            elif status == _TIMEOUT:
                (n,) = _U32.unpack(_recv_exact(sock, 4))
                missing = [_read_key(sock) for _ in range(n)]
                failure = TimeoutError(f"{what}: timed out after {wait:g} s waiting for key(s) {missing} "
                                       f"in the fp4ccl store at {self.address}")
            elif status == _ERROR:
                (n,) = _U32.unpack(_recv_exact(sock, 4))
                msg = _recv_exact(sock, n).decode("utf-8", "replace")
                failure = ValueError(f"{msg} (store at {self.address})")
            else:
                raise ConnectionError(f"bad reply status {status}")
            healthy = True
        except socket.timeout as e:
            raise TimeoutError(f"{what}: no reply from the fp4ccl store at {self.address}") from e
        except OSError as e:
            raise ConnectionError(f"{what}: lost the connection to the fp4ccl store at {self.address}: {e}") from e
        finally:
            if healthy and not self._closed:
                with self._lock:
                    self._idle.append(sock)
            else:
                sock.close()
        if failure is not None:
            raise failure
        return result

    def _timeout(self, timeout) -> float:
        return _wire_timeout(self.timeout if timeout is None else timeout)

    def set(self, key: str, value: bytes) -> None:
        """Store value (bytes) under key, waking anyone blocked on it."""
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"store value must be bytes, got {type(value).__name__}")
        value = bytes(value)
        self._call(f"set({key!r})", _U8.pack(_OP_SET) + _enc_key(key) + _U64.pack(len(value)),
                   lambda s: None, payload=value)

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The value of key, blocking until it is set (TimeoutError after timeout, default the client's)."""
        t = self._timeout(timeout)
        return self._call(f"get({key!r})", _U8.pack(_OP_GET) + _enc_key(key) + _F64.pack(t), _read_value, wait=t)

    def add(self, key: str, delta: int) -> int:
        """Atomically add delta to the integer at key (missing counts as 0) and return the result."""
        return self._call(f"add({key!r})", _U8.pack(_OP_ADD) + _enc_key(key) + _I64.pack(int(delta)),
                          lambda s: _I64.unpack(_recv_exact(s, 8))[0])

    def check(self, key: str) -> bool:
        """Whether key is set, without blocking."""
        return self._call(f"check({key!r})", _U8.pack(_OP_CHECK) + _enc_key(key),
                          lambda s: bool(_recv_exact(s, 1)[0]))

    def delete(self, key: str) -> bool:
        """Remove key; True if it was there."""
        return self._call(f"delete({key!r})", _U8.pack(_OP_DELETE) + _enc_key(key),
                          lambda s: bool(_recv_exact(s, 1)[0]))

    def wait(self, keys, timeout: float | None = None) -> None:
        """Block until every key is set (TimeoutError naming the missing ones after timeout)."""
        if isinstance(keys, str):
            keys = [keys]
        keys = list(keys)
        t = self._timeout(timeout)
        req = _U8.pack(_OP_WAIT) + _U32.pack(len(keys)) + b"".join(map(_enc_key, keys)) + _F64.pack(t)
        self._call(f"wait({len(keys)} keys)", req, lambda s: None, wait=t)

    def close(self) -> None:
        """Close every connection of this client."""
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()
