"""The tests' Ray heads run in their own process group; a watchdog stops that group and removes its temp dir when
the test process that started it dies without cleaning up (SIGKILL, a crashed xdist worker). Checked here on a
stand-in group (`sleep`), which costs a second instead of a Ray start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import watch_group

PARENT = """
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from conftest import watch_group
group = subprocess.Popen(["sleep", "300"], start_new_session=True, stdout=subprocess.DEVNULL)
watch_group(group.pid, sys.argv[2])
print(group.pid, flush=True)
time.sleep(300)
"""


def group_alive(pgid: int) -> bool:
    """Any process of the group still running (a zombie left for init to reap does not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_the_group_is_stopped_when_its_test_process_is_killed(tmp_path):
    temp_dir = tmp_path / "head"
    temp_dir.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(Path(__file__).parent), str(temp_dir)],
                              stdout=subprocess.PIPE, text=True)
    pgid = None
    try:
        pgid = int(parent.stdout.readline())
        assert group_alive(pgid)
        parent.kill()  # no finally, no atexit: only the watchdog is left to clean up
        parent.wait()
        assert wait_until(lambda: not group_alive(pgid), timeout=30), "the orphaned group is still running"
        assert wait_until(lambda: not temp_dir.exists(), timeout=10), "the orphaned group's temp dir is left"
    finally:
        parent.kill()
        parent.stdout.close()
        if pgid is not None and group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_the_watchdog_leaves_once_the_group_is_stopped_normally(tmp_path):
    group = subprocess.Popen(["sleep", "300"], start_new_session=True)
    watchdog = watch_group(group.pid, str(tmp_path))
    try:
        assert watchdog.poll() is None
        group.terminate()
        group.wait()
        watchdog.wait(timeout=30)
        assert watchdog.returncode == 0 and tmp_path.exists()  # the normal stop owns the cleanup
    finally:
        watchdog.kill()
        group.kill()
