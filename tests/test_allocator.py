"""segreward.engine.allocator: glibc's malloc thresholds, set once, opted out by environment."""

import os
import subprocess
import sys

import pytest

CHECK = ("from segreward.engine.allocator import keep_freed_memory, malloc_setting, _glibc\n"
         "import ctypes\n"
         "on = keep_freed_memory()\n"
         "print(on, malloc_setting(), keep_freed_memory(), _glibc() is not None)\n")


def run(env_value):
    env = {**os.environ}
    env.pop("SEGREWARD_MALLOC", None)
    if env_value is not None:
        env["SEGREWARD_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, check=True, capture_output=True, text=True)
    return out.stdout.split()


def test_applied_on_glibc_and_idempotent():
    on, setting, again, glibc = run(None)
    if glibc == "True":
        assert (on, setting, again) == ("True", "keep-freed", "True")
    else:  # not glibc: nothing to set
        assert (on, setting, again) == ("False", "default", "False")


def test_environment_opts_out():
    on, setting, again, _ = run("default")
    assert (on, setting, again) == ("False", "default", "False")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_takes_the_thresholds():
    """mallopt accepts the trim threshold and one of the two mmap thresholds (it returns 0 for a
    value it refuses)."""
    from segreward.engine.allocator import MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK, TRIM_THRESHOLD, _glibc
    if _glibc() is None:
        pytest.skip("not glibc")
    code = ("import ctypes; libc = ctypes.CDLL(None); "
            f"print(libc.mallopt(-3, {MMAP_THRESHOLD}) or libc.mallopt(-3, {MMAP_THRESHOLD_FALLBACK}), "
            f"libc.mallopt(-1, {TRIM_THRESHOLD}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["1", "1"]
