"""The TCP store: every operation, blocking semantics, timeouts, the token, concurrency, raw bytes."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from fp4ccl.bootstrap.store import StoreClient, StoreServer, parse_address

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def server():
    srv = StoreServer(token=TOKEN)
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    c = StoreClient(server.address, TOKEN, timeout=10.0)
    yield c
    c.close()


def test_binds_loopback_by_default(server):
    host, port = parse_address(server.address)
    assert host == "127.0.0.1" and port > 0


def test_set_get_check_delete(client):
    assert not client.check("a")
    client.set("a", b"hello")
    assert client.check("a")
    assert client.get("a") == b"hello"
    client.set("a", b"")  # overwrite, and the empty value is a value
    assert client.get("a") == b""
    assert client.delete("a") is True
    assert client.delete("a") is False
    assert not client.check("a")


def test_add_is_atomic_across_threads_and_clients(server):
    clients = [StoreClient(server.address, TOKEN, timeout=10) for _ in range(8)]
    results = []
    lock = threading.Lock()

    def work(c):
        mine = [c.add("ctr", 1) for _ in range(50)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every increment returned a distinct value: no two adds saw the same old value.
    assert sorted(results) == list(range(1, 801))
    assert clients[0].get("ctr") == b"800"
    assert clients[0].add("ctr", -800) == 0
    assert clients[0].add("fresh", 5) == 5
    for c in clients:
        c.close()


def test_add_on_non_integer_value_is_an_error(client):
    client.set("x", b"\xff\x00")
    with pytest.raises(ValueError, match="not a decimal integer"):
        client.add("x", 1)
    assert client.get("x") == b"\xff\x00"  # untouched, and the connection still works


def test_blocking_get_released_by_later_set_from_another_thread(server):
    getter = StoreClient(server.address, TOKEN, timeout=10)
    setter = StoreClient(server.address, TOKEN, timeout=10)
    got = {}

    def wait_for_it():
        t0 = time.monotonic()
        got["value"] = getter.get("late", timeout=10)
        got["waited"] = time.monotonic() - t0

    t = threading.Thread(target=wait_for_it)
    t.start()
    time.sleep(0.3)
    assert t.is_alive(), "get returned before the key was set"
    setter.set("late", b"now")
    t.join(5)
    assert got["value"] == b"now" and got["waited"] >= 0.25
    getter.close()
    setter.close()


def test_one_client_shared_by_a_blocked_getter_and_a_setter(client):
    # The getter holds one connection; the setter on the same client must not queue behind it.
    out = []
    t = threading.Thread(target=lambda: out.append(client.get("k", timeout=10)))
    t.start()
    time.sleep(0.2)
    client.set("k", b"v")
    t.join(5)
    assert out == [b"v"]


def test_wait_for_several_keys(client, server):
    other = StoreClient(server.address, TOKEN, timeout=10)
    done = threading.Event()
    t = threading.Thread(target=lambda: (client.wait(["k1", "k2", "k3"], timeout=10), done.set()))
    t.start()
    other.set("k1", b"1")
    other.set("k2", b"2")
    time.sleep(0.2)
    assert not done.is_set()
    other.set("k3", b"3")
    t.join(5)
    assert done.is_set()
    client.wait("k1", timeout=0)  # already there: returns at once
    other.close()


def test_get_timeout_names_key_and_address(client, server):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as e:
        client.get("never", timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 5
    assert "never" in str(e.value) and server.address in str(e.value)
    # The connection stays usable after a timeout.
    client.set("after", b"ok")
    assert client.get("after") == b"ok"


def test_wait_timeout_names_only_missing_keys(client, server):
    client.set("here", b"1")
    with pytest.raises(TimeoutError) as e:
        client.wait(["here", "gone1", "gone2"], timeout=0.2)
    msg = str(e.value)
    assert "gone1" in msg and "gone2" in msg and "'here'" not in msg and server.address in msg


def test_default_timeout_is_the_clients(server):
    c = StoreClient(server.address, TOKEN, timeout=0.3)
    with pytest.raises(TimeoutError):
        c.get("nope")
    c.close()


def test_wrong_token_rejected_with_clear_error(server):
    t0 = time.monotonic()
    with pytest.raises(PermissionError) as e:
        StoreClient(server.address, "not-the-token", timeout=10)
    assert time.monotonic() - t0 < 2, "a wrong token must fail fast, not retry until the timeout"
    assert server.address in str(e.value) and "token" in str(e.value)
    with pytest.raises(PermissionError):
        StoreClient(server.address, "", timeout=10)


def test_garbage_peer_is_dropped_and_server_keeps_serving(server, client):
    host, port = parse_address(server.address)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(1) == b"\x02"  # bad-protocol status, then the server hangs up
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:  # unread request bytes make the kernel reset instead of FIN
            pass
    client.set("still", b"alive")
    assert client.get("still") == b"alive"


def test_client_retries_until_server_starts():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    holder = {}

    def start_later():
        time.sleep(0.5)
        holder["srv"] = StoreServer(port=port, token=TOKEN)

    t = threading.Thread(target=start_later)
    t.start()
    c = StoreClient(f"127.0.0.1:{port}", TOKEN, timeout=10)
    c.set("k", b"v")
    assert c.get("k") == b"v"
    c.close()
    t.join()
    holder["srv"].close()


def test_connect_timeout_names_address():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        StoreClient(f"127.0.0.1:{port}", TOKEN, timeout=0.5)


def test_port_in_use_raises(server):
    _, port = parse_address(server.address)
    with pytest.raises(OSError):
        StoreServer(port=port, token=TOKEN)


def test_many_concurrent_clients(server):
    n = 64
    errors = []

    def rank(i):
        try:
            with StoreClient(server.address, TOKEN, timeout=20) as c:
                c.set(f"r/{i}", i.to_bytes(4, "little") * (i + 1))
                c.add("arrived", 1)
                c.wait([f"r/{j}" for j in range(n)], timeout=20)
                for j in range(n):
                    assert c.get(f"r/{j}") == j.to_bytes(4, "little") * (j + 1)
        except Exception as e:  # surfaced below with the rank
            errors.append((i, e))

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    with StoreClient(server.address, TOKEN, timeout=5) as c:
        assert c.get("arrived") == str(n).encode()


def test_all_byte_values_round_trip(client):
    value = bytes(range(256)) * 3
    client.set("bin", value)
    assert client.get("bin") == value
    client.set("bin/\u00e9\u6f22", bytes(range(255, -1, -1)))  # non-ASCII keys too
    assert client.get("bin/\u00e9\u6f22") == bytes(range(255, -1, -1))


def test_large_value(client, rng):
    value = rng.integers(0, 256, size=8 << 20, dtype="uint8").tobytes()
    client.set("big", value)
    assert client.get("big") == value


def test_rejects_non_bytes_value(client):
    with pytest.raises(TypeError, match="bytes"):
        client.set("k", "a string")
    with pytest.raises(TypeError, match="bytes"):
        client.set("k", 3)


def test_server_close_wakes_blocked_get(server):
    c = StoreClient(server.address, TOKEN, timeout=30)
    err = []

    def blocked():
        try:
            c.get("never", timeout=30)
        except Exception as e:
            err.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    server.close()
    t.join(5)
    assert not t.is_alive() and isinstance(err[0], ConnectionError) and server.address in str(err[0])


def test_bad_address():
    with pytest.raises(ValueError, match="host:port"):
        StoreClient("no-port-here", TOKEN)
