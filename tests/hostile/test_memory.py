"""Memory bombs, huge replies, recursion: the rlimits hold and the pool recovers."""
from __future__ import annotations

ONE_BIG = "x = bytearray(2 << 30)\n"

SLOW_GROWTH = """
chunks = []
while True:
    chunks.append(bytearray(1 << 20))
"""

RAISE_RLIMITS = """
import resource
failures = []
for which in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE,
              resource.RLIMIT_FSIZE):
    try:
        resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError) as exc:
        failures.append(type(exc).__name__)
assert len(failures) == 4, failures
chunks = [bytearray(64 << 20) for _ in range(100)]
"""

GIGABYTE_REPLY = "__return_data = b'x' * (1 << 30)\n"
TWO_MB_REPLY = "__return_data = b'x' * (2 << 20)\n"

DEEP_RECURSION = """
def down(n):
    return down(n + 1)
down(0)
"""


def test_one_big_allocation(hostile):
    hostile.expect("memory", ONE_BIG)


def test_slow_growth(hostile):
    hostile.expect("memory", SLOW_GROWTH)


def test_raising_own_rlimits_then_memory_bomb(hostile):
    hostile.expect("memory", RAISE_RLIMITS)


def test_gigabyte_return_data(hostile):
    hostile.expect("memory", GIGABYTE_REPLY)


def test_return_data_over_output_bytes(hostile):
    hostile.expect("output_too_large", TWO_MB_REPLY, error="output_bytes")


def test_deep_recursion(hostile):
    hostile.expect("script_error", DEEP_RECURSION, error="RecursionError")
