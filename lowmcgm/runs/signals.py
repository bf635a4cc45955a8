"""Stop signals: Ctrl-C (SIGINT), SIGTERM (docker stop, a cluster's preemption, systemd) and SIGHUP
(a closed terminal or ssh session) all stop a command the same way.

Python turns only SIGINT into an exception; SIGTERM and SIGHUP kill the process on the spot, losing
everything since the last checkpoint. Here each raises ``Interrupted`` (a ``KeyboardInterrupt``
carrying the signal), so every ``except KeyboardInterrupt`` that saves a checkpoint or cleans up
runs for all three, and the CLI exits with the shell's convention, 128 + the signal number (130
for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP). The training loop routes them itself
(``route_stop_signals``) to stop between steps.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal_name(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports a process a signal ended (SIGINT for a plain KeyboardInterrupt)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def route_stop_signals(handler: Callable[[int, Any], None] = _raise_interrupted) -> Iterator[None]:
    """While the block runs, every stop signal calls ``handler(signum, frame)``; the previous handlers
    come back afterwards. The default handler raises ``Interrupted``. Ignored signals stay ignored.

    Signal handlers belong to the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # A signal ignored when the command started stays ignored: that is what ``nohup`` (SIGHUP) or a
    # shell's background job (SIGINT) asked for, and Python itself keeps an ignored SIGINT ignored.
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
