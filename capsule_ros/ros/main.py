"""``capsule_node``'s entry point, kept light so that a signal is handled from the first instant.

torch and the model import in ``node.run``, which takes seconds; a SIGINT or SIGTERM at any
moment (importing, loading, warming up, serving) must end the process promptly, flush queued
capsule writes, print no error and exit 0. So the handlers are installed here, before any heavy
import: both raise KeyboardInterrupt in the main thread, which every stage unwinds through.
rclpy's own handlers (installed by ``rclpy.init``) chain to these and also wake the executor.
"""
from __future__ import annotations

import signal
import sys


def _interrupt(signum: int, frame: object) -> None:
    # One stop is enough: a terminal's Ctrl-C reaches the node twice under `ros2 launch` (the
    # process group's SIGINT, then launch forwarding it), and a second KeyboardInterrupt in the
    # middle of flushing capsule writes would cut that short.
    _ignore_signals()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _ignore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from .node import run
        return run(argv if argv is not None else sys.argv)
    except KeyboardInterrupt:
        return 0
    except Exception:
        # A signal shuts rclpy's context down before KeyboardInterrupt reaches us; whatever
        # failed because of that ("context is invalid") is part of a clean stop, not an error.
        if _shutting_down():
            return 0
        raise
    finally:
        _ignore_signals()  # nothing may interrupt the interpreter's own exit


def _shutting_down() -> bool:
    try:
        import rclpy
        return not rclpy.ok()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
