"""What every test file shares: Ctrl-C for the children, and a bounded wait for a child's output."""

import os
import re
import select
import signal
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils  # noqa: E402

# A `make test` started in the background would hand the children it interrupts an ignored SIGINT.
utils.take_back_sigint()


@pytest.fixture
def read_until():
    """read_until(p, stream, pattern, timeout=300) -> the text read from the child's pipe up to `pattern`.

    It waits for an event (a line the child prints), not for a time, so a slow machine only waits
    longer. The timeout turns a hang into a failure that says where the child was: the child gets
    SIGABRT, and with PYTHONFAULTHANDLER=1 in its environment it prints every thread's stack."""

    def wait(p, stream, pattern, timeout=300):
        fd, seen, deadline = stream.fileno(), "", time.monotonic() + timeout
        while not re.search(pattern, seen):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                p.send_signal(signal.SIGABRT)
                _, err = p.communicate(timeout=30)
                pytest.fail(f"no {pattern!r} within {timeout} s; read: {seen[-1000:]!r}; stderr: {(err or '')[-3000:]}")
            chunk = os.read(fd, 65536).decode(errors="replace")
            if not chunk:
                pytest.fail(f"the child ended before {pattern!r}: {seen[-2000:]}")
            seen += chunk
        return seen

    return wait
