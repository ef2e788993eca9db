"""Kill a launcher's rank process groups if the launcher dies without tearing them down.

Run by fp4ccl-run as a script of its own (by path: it imports nothing of fp4ccl, so it starts fast and works
wherever the launcher runs). It reads its stdin, a pipe whose only writer is the launcher:

    g <pgid>    a rank's process group, sent after the rank starts
    done        the launcher tore the job down itself; exit without killing anything

End of file without "done" means the launcher ended without its teardown, which only SIGKILL (or a crash of
the interpreter) does. Each rank dies then by its parent-death signal, but processes a rank started do not:
they are in the rank's process group, so SIGKILL to every recorded group ends them.
"""
import os
import signal
import sys


def main() -> int:
    # In a session of its own (the launcher starts it so), but a Ctrl-C meant for the launcher must never
    # stop the guard before the launcher finishes: it ends only by its pipe.
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    groups = []
    for line in sys.stdin.buffer:
        word = line.split()
        if word == [b"done"]:
            return 0
        if len(word) == 2 and word[0] == b"g" and word[1].isdigit():
            groups.append(int(word[1]))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
