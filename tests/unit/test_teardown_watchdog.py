"""The exit watchdog armed after a completed multi-process run: a rank whose teardown hangs still exits 0."""

import subprocess
import sys
import time

HANGING_RANK = """
import time
from difftrain.training.distributed import exit_if_teardown_hangs
exit_if_teardown_hangs(0.5)
print("run complete", flush=True)
time.sleep(600)  # stands in for a teardown that never returns
"""

FINISHING_RANK = """
from difftrain.training.distributed import exit_if_teardown_hangs
exit_if_teardown_hangs(30)
print("run complete", flush=True)
"""


def test_a_hanging_teardown_ends_with_status_0_and_a_warning():
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", HANGING_RANK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "run complete" in result.stdout
    assert "exiting without it" in result.stderr
    assert time.monotonic() - start < 100  # the sleep of 600 s was cut short


def test_a_normal_exit_is_not_delayed_by_the_timer():
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", FINISHING_RANK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "exiting without it" not in result.stderr
    assert time.monotonic() - start < 25  # the daemon timer of 30 s does not keep the process alive
