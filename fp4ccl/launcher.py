"""fp4ccl-run: start one process per rank, host the TCP store, prefix output, and stop everything on failure."""
from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import glob
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

from fp4ccl._log import get_logger
from fp4ccl.bootstrap.env import STAMP, launcher_stamp
from fp4ccl.bootstrap.store import StoreClient, StoreServer, format_address

PROG = "fp4ccl-run"
_KEY = "fp4ccl/launcher/"
_TAIL_LINES = 20
# How often a launcher of a multi-node job looks for a failure published by another node.
_REMOTE_POLL_S = 0.5
# Node 0 declares a node lost when its heartbeat counter has not moved for this long (a SIGKILLed launcher).
_HEARTBEAT_TIMEOUT_S = float(os.environ.get("FP4CCL_HEARTBEAT_TIMEOUT", 30.0))
# How long, after the first rank failed, the others may take to end by themselves before the SIGTERM.
_SETTLE_S = 0.5
# The names _torch_env sets for each rank, for code written for torchrun; the launcher stamp leaves them out.
_TORCH_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

USAGE = (f"{PROG} [-n NPROC_PER_NODE] [--nnodes N --node-rank R --master-addr HOST --master-port P] "
         "[--log-dir DIR] [--ranks-filter 0,2] [--timeout SECONDS] [--grace-period SECONDS] "
         "[--rdzv-timeout SECONDS] (script.py | -m module) [args...]")


class LaunchError(Exception):
    """A problem reported as one line before (or instead of) running the job."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors on a single line."""

    def error(self, message):
        sys.stderr.write(f"{PROG}: error: {message} (see {PROG} --help)\n")
        sys.exit(2)


def _parser() -> _Parser:
    p = _Parser(prog=PROG, usage=USAGE, allow_abbrev=False,
                description="Run a Python script (or -m module) as one process per rank, fp4ccl-style.",
                epilog="See docs/LAUNCHER.md for the environment each rank gets and the exit codes.")
    p.add_argument("-n", "--nproc-per-node", type=int, default=None,
                   help="ranks on this node (default: visible GPUs, or 4 without GPUs)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (launchers) in the job")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1", help="host of node 0, where the store runs")
    p.add_argument("--master-port", type=int, default=None,
                   help="store port on node 0 (default: a free port on one node, 29500 on several)")
    p.add_argument("--log-dir", default=None, help="also write DIR/rank<N>.out and DIR/rank<N>.err")
    p.add_argument("--ranks-filter", default=None, help="show output of these global ranks only, e.g. 0,2")
    p.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds")
    p.add_argument("--grace-period", type=float, default=float(os.environ.get("FP4CCL_KILL_GRACE", 5.0)),
                   help="seconds between SIGTERM and SIGKILL when stopping ranks (default 5, FP4CCL_KILL_GRACE)")
    p.add_argument("--rdzv-timeout", type=float, default=float(os.environ.get("FP4CCL_RDZV_TIMEOUT", 300.0)),
                   help="seconds to wait for every node to join (default 300, FP4CCL_RDZV_TIMEOUT)")
    p.add_argument("-m", dest="module", default=None, help="run a module, like python -m")
    return p


# Launcher options that consume the following word; used to find where the user's program starts.
_VALUE_FLAGS = {"-n", "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                "--log-dir", "--ranks-filter", "--timeout", "--grace-period", "--rdzv-timeout"}


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split argv into the launcher's own options and the program (script or -m module) with its args."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return argv[:i], argv[i + 1:]
        if a == "-m":
            return argv[:i + 2], argv[i + 2:]
        if a.startswith("-m") and not a.startswith("--"):  # -mpkg.mod
            return argv[:i + 1], argv[i + 1:]
        if a in _VALUE_FLAGS:
            i += 2
            continue
        if a.startswith("-") and a != "-":
            i += 1
            continue
        return argv[:i], argv[i:]
    return argv, []


def visible_gpu_count() -> int:
    """GPUs this process can see, counted without initialising CUDA (0 when there are none)."""
    physical = 0
    try:
        physical = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        pass
    if physical == 0:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            physical = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None or physical == 0:
        return physical
    listed = 0
    # CUDA stops enumerating at the first invalid entry, so do we.
    for item in cvd.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break
        listed += 1
    return min(listed, physical)


def _parse_ranks(text: str) -> set[int]:
    try:
        ranks = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise LaunchError(f"--ranks-filter must be comma-separated rank numbers, got {text!r}") from None
    if not ranks or min(ranks) < 0:
        raise LaunchError(f"--ranks-filter must list ranks >= 0, got {text!r}")
    return ranks


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _describe_code(code: int) -> str:
    return f"killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def remove_job_files(job_id: str) -> int:
    """Unlink the files the job's ranks left in shared memory; return how many went.

    The host backend keeps each collective's payload in a file under backends.host.shm_prefix(job id)
    (in FP4CCL_SHM_DIR, which the ranks inherit from us, else /dev/shm); a rank killed in the middle of
    a collective never removes its own, and each can be 64 MiB of RAM. The job id is fresh per job and
    of fixed length, so the pattern never reaches another job's files. Errors are ignored: a file may
    vanish under us, or belong to another user.
    """
    if not job_id:
        return 0
    from fp4ccl.backends.host import shm_prefix   # numpy comes with it: imported at teardown only
    removed = 0
    for path in glob.glob(glob.escape(shm_prefix(job_id)) + "*"):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def _pdeathsig_setup():
    """Return a preexec_fn making children die with the launcher even if it is SIGKILLed (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def setup():
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return setup


class _Guard:
    """The process that kills the ranks' process groups if this launcher is SIGKILLed (fp4ccl/_launch_guard.py).

    Best effort: where it cannot start, the ranks still die by their parent-death signal."""

    def __init__(self):
        self.proc = None
        try:
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch_guard.py")
            self.proc = subprocess.Popen([sys.executable, "-S", script],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        except OSError as e:
            get_logger("fp4ccl.launcher").warning("no guard for a SIGKILLed launcher (%s): processes the ranks "
                                                  "start would outlive one", e)

    def _send(self, line: str) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.proc = None

    def watch(self, pgid: int) -> None:
        self._send(f"g {pgid}")

    def dismiss(self) -> None:
        """The launcher's own teardown ran: let the guard go without killing anything."""
        proc = self.proc
        self._send("done")
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass


def _check_log_dir(log_dir: str) -> None:
    """Create --log-dir if needed; a LaunchError before anything starts if it cannot hold the logs."""
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as e:
        raise LaunchError(f"--log-dir {log_dir}: {e.strerror or e}") from None
    if not os.access(log_dir, os.W_OK | os.X_OK):
        raise LaunchError(f"--log-dir {log_dir}: not writable")


def _open_logs(log_dir: str, rank: int) -> tuple:
    """rank<N>.out and rank<N>.err in log_dir, opened for writing (LaunchError naming the file otherwise)."""
    files = []
    for name in ("out", "err"):
        path = os.path.join(log_dir, f"rank{rank}.{name}")
        try:
            files.append(open(path, "wb"))
        except OSError as e:
            for f in files:
                f.close()
            raise LaunchError(f"--log-dir: cannot write {path}: {e.strerror or e}") from None
    return tuple(files)


class _Rank:
    """One child process, its output pumps and the tail of its stderr."""

    def __init__(self, rank: int, local_rank: int, proc: subprocess.Popen, logs: tuple,
                 show: bool, out_lock: threading.Lock):
        self.rank = rank
        self.local_rank = local_rank
        self.proc = proc
        self.pid = proc.pid
        self.code: int | None = None
        # Signals the launcher sent while the rank was still running: the report calls a rank "stopped by
        # the launcher" only when it died of one of them, not when it exited by itself meanwhile.
        self.sent: set[int] = set()
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.pumps = []
        for pipe, target, name, log in ((proc.stdout, sys.stdout, "out", logs[0]),
                                        (proc.stderr, sys.stderr, "err", logs[1])):
            t = threading.Thread(target=self._pump, args=(pipe, target if show else None, log, name == "err",
                                                          out_lock), name=f"rank{rank}-{name}", daemon=True)
            t.start()
            self.pumps.append(t)

    def _pump(self, pipe, target, log, keep_tail: bool, out_lock: threading.Lock) -> None:
        prefix = f"[rank{self.rank}]: "
        try:
            for raw in iter(pipe.readline, b""):
                if log is not None:
                    log.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    log.flush()
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if keep_tail:
                    self.tail.append(line)
                if target is not None:
                    with out_lock:
                        try:
                            target.write(prefix + line + "\n")
                            target.flush()
                        except (OSError, ValueError):  # our own stdout went away; keep draining the child
                            target = None
        finally:
            pipe.close()
            if log is not None:
                log.close()

    def poll(self) -> int | None:
        if self.code is None:
            self.code = self.proc.poll()
        return self.code

    def stop(self, signum: int) -> None:
        """Signal a rank the launcher is stopping (its whole process group), if it is still running."""
        if self.poll() is None:
            self.sent.add(signum)
            self.signal_group(signum)

    @property
    def stopped_by_launcher(self) -> bool:
        return self.code is not None and self.code < 0 and -self.code in self.sent

    def signal_group(self, signum: int) -> None:
        # The rank leads its own process group (start_new_session), so this reaches its whole tree.
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class Launcher:
    """One node's share of a job: rendezvous, spawn, watch, tear down, report."""

    def __init__(self, args: argparse.Namespace, program: list[str]):
        self.args = args
        self.program = program
        self.host = socket.gethostname()
        self.ranks: list[_Rank] = []
        self.info: dict | None = None   # what rendezvous() returned
        self.server: StoreServer | None = None
        self.client: StoreClient | None = None
        self.signals: list[int] = []
        self.guard: _Guard | None = None
        self.out_lock = threading.Lock()
        # Set once a store call failed after rendezvous: node 0's launcher is gone, so every later call would
        # only retry its connection until the client's timeout.
        self.store_lost = False
        self.joined = False         # this node's rank claim succeeded: it is a member of the job
        self.claim_refused = False  # another launcher holds this --node-rank: this one is a stray

    # ---- signals -------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def _install_signal_handlers(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._on_signal)

    def _interrupted(self) -> None:
        if self.signals:
            raise _Interrupted(self.signals[0])

    # ---- rendezvous ----------------------------------------------------------------------------
    def rendezvous(self) -> dict:
        """Join the job through the store on node 0; return this node's rank offset, world size, job id."""
        a = self.args
        multi = a.nnodes > 1
        token = os.environ.get("FP4CCL_TOKEN", "")
        if multi and not token:
            raise LaunchError("a multi-node job needs the same FP4CCL_TOKEN exported on every node, e.g. "
                              "export FP4CCL_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))')")
        token = token or secrets.token_hex(16)
        port = a.master_port if a.master_port is not None else (29500 if multi else 0)
        address = None
        if a.node_rank == 0:
            self.server = self._host_store(a.master_addr, port, token)
            address = format_address(a.master_addr, self.server.port)
        else:
            address = format_address(a.master_addr, port)
        try:
            self.client = StoreClient(address, token, timeout=a.rdzv_timeout)
        except PermissionError as e:
            raise LaunchError(str(e)) from None
        except (TimeoutError, ConnectionError) as e:
            raise LaunchError(f"rendezvous failed: node {a.node_rank} could not reach node 0's store: {e}") from None
        c = self.client
        if a.node_rank == 0:
            torch_port = self._free_port(self.server.host)
            c.set(_KEY + "job", json.dumps({"job_id": secrets.token_hex(6), "torch_port": torch_port,
                                            "nnodes": a.nnodes}).encode())
        # Checked before this node registers, so that node 0 never starts ranks for a node that then leaves.
        job = json.loads(self._rdzv_get([_KEY + "job"], address)[0])
        if job["nnodes"] != a.nnodes:
            raise LaunchError(f"node 0 started a job of --nnodes {job['nnodes']}, this node says {a.nnodes}")
        claims = c.add(_KEY + f"node/{a.node_rank}/claims", 1)
        if claims != 1:
            self.claim_refused = True
            raise LaunchError(f"node rank {a.node_rank} already joined this job at {address}; "
                              "give each node a distinct --node-rank")
        self.joined = True
        c.set(_KEY + f"node/{a.node_rank}", json.dumps({"host": self.host, "pid": os.getpid(),
                                                        "nproc": a.nproc_per_node}).encode())
        nodes = [json.loads(v) for v in self._rdzv_get([_KEY + f"node/{i}" for i in range(a.nnodes)], address)]
        if a.node_rank == 0:
            c.set(_KEY + "started", b"1")   # from now on a launcher that is no member cannot stop the job
        # From here on a store that does not answer within the heartbeat limit is lost, not slow.
        c.timeout = min(c.timeout, _HEARTBEAT_TIMEOUT_S)
        offset = sum(n["nproc"] for n in nodes[:a.node_rank])
        return {"address": address, "token": token, "job_id": job["job_id"], "torch_port": job["torch_port"],
                "offset": offset, "world": sum(n["nproc"] for n in nodes), "nodes": nodes}

    def _host_store(self, host: str, port: int, token: str) -> StoreServer:
        try:
            return StoreServer(host=host, port=port, token=token)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LaunchError(f"cannot host the store on {format_address(host, port)}: port {port} is in use "
                                  "(pick another --master-port)") from None
            if e.errno == errno.EADDRNOTAVAIL and self.args.nnodes > 1:
                # --master-addr may name a NAT or load-balancer address this host cannot bind: listen everywhere.
                return self._host_store("0.0.0.0", port, token)
            raise LaunchError(f"cannot host the store on {format_address(host, port)}: {e.strerror or e}") from None

    @staticmethod
    def _free_port(host: str) -> int:
        """A currently free port for code that starts its own torch store on MASTER_PORT."""
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def _rdzv_get(self, keys: list[str], address: str) -> list[bytes]:
        # Wait in short slices so a signal (Ctrl-C) during rendezvous is honoured promptly.
        deadline = time.monotonic() + self.args.rdzv_timeout
        while True:
            self._interrupted()
            left = deadline - time.monotonic()
            try:
                if self.args.nnodes > 1 and self.client.check(_KEY + "failure"):
                    f = json.loads(self.client.get(_KEY + "failure"))
                    raise LaunchError(f"rendezvous failed: node {f['node']} (host {f['host']}) stopped the job: "
                                      f"{f['why']}")
                self.client.wait(keys, timeout=max(0.0, min(0.25, left)))
                return [self.client.get(k) for k in keys]
            except TimeoutError:
                if left <= 0.25:
                    missing = [k.rsplit("/", 1)[1] for k in keys if not self.client.check(k)]
                    what = (f"node(s) {', '.join(missing)} never joined" if keys[0] != _KEY + "job"
                            else "node 0 never published the job")
                    raise LaunchError(f"rendezvous timed out after {self.args.rdzv_timeout:g} s: {what} "
                                      f"(store {address}, --nnodes {self.args.nnodes})") from None
            except ConnectionError as e:
                self.store_lost = True
                raise LaunchError(f"rendezvous failed: {e}") from None

    # ---- spawning ------------------------------------------------------------------------------
    def _child_env(self, info: dict, rank: int, local_rank: int) -> dict:
        env = dict(os.environ)
        a = self.args
        env.update({
            "FP4CCL_RANK": str(rank), "FP4CCL_WORLD_SIZE": str(info["world"]),
            "FP4CCL_LOCAL_RANK": str(local_rank), "FP4CCL_LOCAL_SIZE": str(a.nproc_per_node),
            "FP4CCL_NODE_RANK": str(a.node_rank), "FP4CCL_STORE": info["address"],
            "FP4CCL_TOKEN": info["token"], "FP4CCL_JOB_ID": info["job_id"],
            "PYTHONUNBUFFERED": "1",
        })
        # For code written for torchrun, and set even where inherited: values from an outer job would give every
        # rank the same RANK and an occupied MASTER_PORT. MASTER_PORT is not the store's port, since torch binds
        # its own store there.
        env.update(self._torch_env(info, rank, local_rank))
        # Last, over exactly what the rank receives; the stamp leaves out the torch names set just above.
        env[STAMP] = launcher_stamp(env)
        return env

    def _torch_env(self, info: dict, rank: int, local_rank: int) -> dict:
        a = self.args
        values = (rank, info["world"], local_rank, a.nproc_per_node, a.master_addr, info["torch_port"])
        return dict(zip(_TORCH_NAMES, map(str, values)))   # in _TORCH_NAMES' order

    def spawn(self, info: dict, show: set[int] | None) -> None:
        a = self.args
        if a.module:
            cmd = [sys.executable, "-u", "-m", a.module, *self.program]
        else:
            cmd = [sys.executable, "-u", *self.program]
        logs = {}
        try:
            for local in range(a.nproc_per_node):
                # All opened before any rank starts: a log that cannot be written stops the job with nothing to kill.
                logs[local] = _open_logs(a.log_dir, info["offset"] + local) if a.log_dir else (None, None)
        except LaunchError:
            for files in logs.values():
                for f in files:
                    f.close()
            raise
        inherited = sorted(k for k in _TORCH_NAMES if k in os.environ)
        if inherited and get_logger("fp4ccl.launcher").isEnabledFor(logging.INFO):
            self._say("setting " + ", ".join(f"{k} (inherited {os.environ[k]})" for k in inherited) + " for each rank")
        preexec = _pdeathsig_setup()
        self.guard = _Guard()
        for local in range(a.nproc_per_node):
            rank = info["offset"] + local
            proc = subprocess.Popen(cmd, env=self._child_env(info, rank, local), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=preexec)
            self.guard.watch(proc.pid)   # start_new_session: the rank's pid is its group's id
            self.ranks.append(_Rank(rank, local, proc, logs[local], show is None or rank in show, self.out_lock))

    # ---- watching and stopping -----------------------------------------------------------------
    def watch(self, info: dict) -> dict:
        """Poll ranks until all finish or something ends the job; return what ended it."""
        a = self.args
        multi = a.nnodes > 1
        deadline = None if a.timeout is None else time.monotonic() + a.timeout
        next_remote = 0.0
        done_published = False
        beats = {i: (None, time.monotonic()) for i in range(1, a.nnodes)}  # node -> (last counter, seen at)
        while True:
            for r in self.ranks:
                if r.code is None and r.poll() is not None and r.code != 0:
                    self._publish_failure(r)
                    return {"kind": "rank", "rank": r}
            if self.signals:
                return {"kind": "signal", "signum": self.signals[0]}
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return {"kind": "timeout"}
            local_done = all(r.code is not None for r in self.ranks)
            if not multi and local_done:
                return {"kind": "ok"}
            if multi and now >= next_remote:
                next_remote = now + _REMOTE_POLL_S
                try:
                    self.client.add(_KEY + f"heartbeat/{a.node_rank}", 1)
                    if a.node_rank == 0:
                        lost = self._silent_node(beats, now)
                        if lost is not None:
                            return {"kind": "lost", "error": lost[1], "node": lost[0]}
                    if local_done and not done_published:
                        self.client.set(_KEY + f"done/{a.node_rank}", b"0")
                        done_published = True
                    if self.client.check(_KEY + "failure"):
                        return {"kind": "remote", "failure": json.loads(self.client.get(_KEY + "failure"))}
                    if local_done and (a.node_rank != 0 or all(
                            self.client.check(_KEY + f"done/{i}") for i in range(1, a.nnodes))):
                        return {"kind": "ok"}
                except (ConnectionError, TimeoutError) as e:
                    self.store_lost = True
                    if local_done:  # our part is finished; node 0 closing its store afterwards is normal
                        return {"kind": "ok"}
                    return {"kind": "lost", "error": f"lost contact with the job's store: {e}"}
            time.sleep(0.02)

    def _silent_node(self, beats: dict, now: float) -> tuple[int, str] | None:
        """On node 0: a node that has neither finished nor heartbeat within the timeout, described."""
        for node, (last, seen) in beats.items():
            if self.client.check(_KEY + f"done/{node}"):
                continue
            count = self.client.add(_KEY + f"heartbeat/{node}", 0)
            if count != last:
                beats[node] = (count, now)
            elif now - seen > _HEARTBEAT_TIMEOUT_S:
                return node, (f"node {node} has not been heard from for {_HEARTBEAT_TIMEOUT_S:g} s "
                              "(its launcher died?); FP4CCL_HEARTBEAT_TIMEOUT sets this limit")
        return None

    def _publish_failure(self, r: _Rank) -> None:
        if self.args.nnodes == 1 or self.client is None:
            return
        try:
            self._claim_failure({"rank": r.rank, "pid": r.pid, "code": r.code})
        except (ConnectionError, TimeoutError):
            pass

    def _claim_failure(self, record: dict) -> None:
        """Publish `record` (with this node and host) as the job's failure, unless a node already published one:
        the first failure is the root cause the other nodes report."""
        if self.client.add(_KEY + "failure/claims", 1) == 1:
            self.client.set(_KEY + "failure", json.dumps({**record, "node": self.args.node_rank,
                                                          "host": self.host}).encode())

    def stop_all(self, first_signal: int = signal.SIGTERM) -> None:
        """Signal every live rank, escalate to SIGKILL after the grace period, wait for all of them."""
        live = [r for r in self.ranks if r.poll() is None]
        for r in live:
            r.stop(first_signal)
        deadline = time.monotonic() + self.args.grace_period
        seen_signals = len(self.signals)
        while any(r.poll() is None for r in live) and time.monotonic() < deadline:
            if len(self.signals) > seen_signals:  # a second Ctrl-C: stop waiting politely
                break
            time.sleep(0.02)
        for r in live:
            r.stop(signal.SIGKILL)
        for r in live:
            r.code = r.proc.wait()

    def reap(self) -> None:
        """Kill what is left in each rank's process group (daemons, grandchildren) and drain the pipes."""
        for r in self.ranks:
            if r.poll() is None:
                r.stop(signal.SIGKILL)
                r.code = r.proc.wait()
            r.signal_group(signal.SIGKILL)
        end = time.monotonic() + 2.0
        for r in self.ranks:
            for t in r.pumps:
                t.join(max(0.0, end - time.monotonic()))

    # ---- reporting -----------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        with self.out_lock:
            for line in text.splitlines():
                sys.stderr.write(f"{PROG}: {line}\n")
            sys.stderr.flush()

    def report(self, ended: dict) -> int:
        """Print the root-cause report and return the launcher's exit status."""
        a = self.args
        kind = ended["kind"]
        others = [r for r in self.ranks if r is not ended.get("rank")]
        stopped = [r for r in others if r.stopped_by_launcher]
        # Ranks that ended non-zero by themselves, before or while the launcher stopped the job (e.g. every
        # rank failing the same import): their own exit code, never "stopped by the launcher".
        failed = [r for r in others if not r.stopped_by_launcher and r.code]
        summary = [f"{head}: " + ", ".join(f"{r.rank} ({_describe_code(r.code)})" for r in rs)
                   for head, rs in (("other failed ranks", failed), ("ranks stopped by the launcher", stopped)) if rs]
        if kind == "rank":
            r = ended["rank"]
            status = _exit_status(r.code)
            lines = [f"job failed: rank {r.rank} {_describe_code(r.code)}",
                     f"root cause: rank {r.rank} (node {a.node_rank}, local rank {r.local_rank}) on host "
                     f"{self.host}, pid {r.pid}: {_describe_code(r.code)}"]
            lines += self._tail_lines(r)
        elif kind == "signal":
            status = 128 + ended["signum"]
            lines = [f"job interrupted: the launcher received {_signal_name(ended['signum'])}"
                     + (" and passed it to every rank" if self.ranks else " before any rank started")]
        elif kind == "timeout":
            status = 124
            lines = [f"job failed: timeout after {a.timeout:g} s (--timeout); ranks still running were stopped"]
            for r in self.ranks:
                if r.sent:
                    lines += self._tail_lines(r, 5)
        elif kind == "remote":
            f = ended["failure"]
            status = _exit_status(f["code"])
            if f["rank"] < 0:
                lines = [f"job stopped by node {f['node']} (host {f['host']}): {f['why']}; see that node's report"]
            else:
                lines = [f"job failed on another node: rank {f['rank']} (node {f['node']}) on host {f['host']}, "
                         f"pid {f['pid']}: {_describe_code(f['code'])}; see that node's report"]
        elif kind == "lost":
            status = 1
            lines = [f"job failed: {ended['error']}"]
        else:
            return 0
        lines += summary
        lines.append(f"exit code {status}")
        self._say("\n".join(lines))
        return status

    @staticmethod
    def _tail_lines(r: _Rank, n: int = _TAIL_LINES) -> list[str]:
        tail = list(r.tail)[-n:]
        if not tail:
            return [f"rank {r.rank} wrote nothing to stderr"]
        return [f"last {len(tail)} line(s) of rank {r.rank}'s stderr:"] + [f"  | {t}" for t in tail]

    # ---- the whole run -------------------------------------------------------------------------
    def run(self, show: set[int] | None) -> int:
        self._install_signal_handlers()
        ended = {"kind": "ok"}
        try:
            info = self.info = self.rendezvous()
            if show is not None and max(show) >= info["world"]:
                raise LaunchError(f"--ranks-filter names rank {max(show)}, but the job has {info['world']} ranks")
            self._interrupted()
            self.spawn(info, show)
            ended = self.watch(info)
            if ended["kind"] == "rank":
                self._settle()
            if ended["kind"] != "ok":
                self.stop_all(ended["signum"] if ended["kind"] == "signal" else signal.SIGTERM)
        except _Interrupted as e:
            ended = {"kind": "signal", "signum": e.signum}
            self.stop_all(e.signum)
        except LaunchError as e:
            ended = {"kind": "launch", "error": str(e)}
            self.stop_all()
        finally:
            self.reap()
            if self.guard is not None:
                self.guard.dismiss()
            self._finish_multinode(ended)
            self._remove_job_files(ended)
            if self.client is not None:
                self.client.close()
            if self.server is not None:
                self.server.close()
        if ended["kind"] == "launch":
            raise LaunchError(ended["error"])
        return self.report(ended)

    def _settle(self) -> None:
        """After the first rank failed, give the others a moment to end by themselves: ranks failing on their
        own at about the same time (every rank missing one import, say) are then reported with their own exit
        codes instead of as stopped by the launcher's SIGTERM."""
        end = time.monotonic() + _SETTLE_S
        while time.monotonic() < end and not self.signals and any(r.poll() is None for r in self.ranks):
            time.sleep(0.01)

    def _tell_other_nodes(self, ended: dict) -> None:
        """Publish why this node ends the whole job (unless a node already did), for the other nodes to stop."""
        a = self.args
        if ended["kind"] == "signal":
            why, code = f"its launcher received {_signal_name(ended['signum'])}", -ended["signum"]
        elif ended["kind"] == "timeout":
            why, code = f"it timed out after {a.timeout:g} s", 124
        else:   # lost, launch
            why, code = ended["error"], 1
        self._claim_failure({"rank": -1, "pid": os.getpid(), "why": why, "code": code})

    def _finish_multinode(self, ended: dict) -> None:
        a = self.args
        if a.nnodes == 1 or self.client is None or self.store_lost:
            return
        # Every call below reports or tidies up: none may keep a launcher whose job is over for long.
        self.client.timeout = min(self.client.timeout, 5.0)
        try:
            # A failure ends the whole job, not just this node's ranks (also before any rank started here: the
            # other nodes may have started theirs, or wait for this one at rendezvous). A launcher that is no
            # member (a stray with a taken --node-rank, or one that failed its checks once the job runs) only
            # fails itself.
            member = self.joined or (not self.claim_refused and not self.client.check(_KEY + "started"))
            if ended["kind"] in ("signal", "timeout", "lost", "launch") and member:
                self._tell_other_nodes(ended)
            if self.ranks:   # with nothing run here, publishing "done" would mislead the other nodes
                self.client.set(_KEY + f"done/{a.node_rank}", b"1" if ended["kind"] != "ok" else b"0")
        except (ConnectionError, TimeoutError):
            self.store_lost = True
            return
        if self.server is not None and ended["kind"] != "ok" and not self.ranks:
            # Failed before any rank started: keep the store up for the others' next poll of the failure (every
            # 0.25 s at rendezvous, 0.5 s while running), so they stop with its reason, not a lost connection.
            end = time.monotonic() + 2 * _REMOTE_POLL_S + 0.5
            while time.monotonic() < end and not self.signals[1:]:
                time.sleep(0.05)
            return
        if self.server is not None and ended["kind"] != "ok":
            # Keep the store up long enough for the other nodes to see the failure and stop.
            end = time.monotonic() + self.args.grace_period + 5 * _REMOTE_POLL_S + 2.0
            keys = [_KEY + f"done/{i}" for i in range(1, a.nnodes) if i != ended.get("node")]
            while time.monotonic() < end and not self.signals[1:]:
                try:
                    if all(self.client.check(k) for k in keys):
                        break
                except (ConnectionError, TimeoutError):
                    break
                time.sleep(0.05)

    def _remove_job_files(self, ended: dict) -> None:
        """Once every rank of the job on this host has exited, remove the files they left in /dev/shm."""
        if not self.ranks or self.info is None:
            return
        a = self.args
        # Several launchers of one job may share a host (a multi-node job tried on one machine), and so its
        # files: the last one to finish removes them, not the first, whose peers' ranks may still use them.
        # A node found lost is not waited for: its launcher is gone, and its ranks with it.
        peers = [i for i, node in enumerate(self.info["nodes"])
                 if node["host"] == self.host and i != a.node_rank and i != ended.get("node")]
        if peers and not self.store_lost:
            try:
                if not all(self.client.check(_KEY + f"done/{i}") for i in peers):
                    return
            except (ConnectionError, TimeoutError):
                pass  # node 0 closes its store only once every node is done, or the job is lost anyway
        removed = remove_job_files(self.info["job_id"])
        if removed and get_logger("fp4ccl.launcher").isEnabledFor(logging.INFO):
            self._say(f"removed {removed} leftover file(s) of job {self.info['job_id']} from shared memory")


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    """Entry point of fp4ccl-run; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own, program = _split_argv(argv)
    args = _parser().parse_args(own)
    try:
        if args.module is None and not program:
            raise LaunchError("no program given: pass script.py or -m module")
        if args.module is None and not os.path.isfile(program[0]):
            if re.fullmatch(r"python[\d.]*", os.path.basename(program[0])):
                raise LaunchError(f"fp4ccl-run starts Python itself: give the script, not {program[0]!r} "
                                  f"(fp4ccl-run -n 4 {' '.join(program[1:2]) or 'train.py'} ...)")
            raise LaunchError(f"script not found: {program[0]}")
        if args.nproc_per_node is None:
            args.nproc_per_node = visible_gpu_count() or 4
        if args.nproc_per_node < 1:
            raise LaunchError(f"-n/--nproc-per-node must be at least 1, got {args.nproc_per_node}")
        if args.nnodes < 1:
            raise LaunchError(f"--nnodes must be at least 1, got {args.nnodes}")
        if not 0 <= args.node_rank < args.nnodes:
            raise LaunchError(f"--node-rank must be in [0, {args.nnodes - 1}], got {args.node_rank}")
        if args.master_port is not None and not 0 <= args.master_port <= 65535:
            raise LaunchError(f"--master-port must be in [0, 65535], got {args.master_port}")
        if args.nnodes > 1 and args.master_port == 0:
            raise LaunchError("--master-port 0 cannot work on several nodes: the others need to know the port")
        for flag in ("timeout", "grace_period", "rdzv_timeout"):
            v = getattr(args, flag)
            if v is not None and not v > 0 and not (flag == "grace_period" and v == 0):
                raise LaunchError(f"--{flag.replace('_', '-')} must be positive, got {v:g}")
        if args.log_dir:
            _check_log_dir(args.log_dir)
        show = _parse_ranks(args.ranks_filter) if args.ranks_filter else None
        return Launcher(args, program).run(show)
    except LaunchError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
