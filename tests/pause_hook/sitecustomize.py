"""Test-only fault injection: stops a workflow process at one exact file operation, so that a test
can SIGKILL the run at that moment (tests/test_kills.py). Python imports this module at start-up
when its folder is on PYTHONPATH, in every process of the run (Snakemake, accelerate's ranks, the
stages); it does nothing unless ADPA_TEST_PAUSE is set.

ADPA_TEST_PAUSE="<call> <before|after> <glob>": <call> is `replace` (os.replace, matched on its
destination), `fsync` (os.fsync, matched on the file's path) or `write_text` (pathlib.Path.write_text);
<glob> is matched against the absolute path. The process that hits it writes its pid to the file
ADPA_TEST_PAUSED and sleeps until it is killed.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import pathlib
import time


def _install(spec: str, marker: str) -> None:
    call, when, pattern = spec.split(" ", 2)
    if when not in ("before", "after"):
        raise ValueError(f"ADPA_TEST_PAUSE: expected before or after, got {when!r}")
    rename = os.rename  # the marker must not go through a patched os.replace

    def pause() -> None:
        with open(f"{marker}.{os.getpid()}", "w") as handle:
            handle.write(str(os.getpid()))
        rename(f"{marker}.{os.getpid()}", marker)
        while True:
            time.sleep(60)

    def wrap(function, path_of):
        @functools.wraps(function)
        def paused(*args, **kwargs):
            hit = fnmatch.fnmatch(os.path.abspath(os.fspath(path_of(*args, **kwargs))), pattern)
            if hit and when == "before":
                pause()
            result = function(*args, **kwargs)
            if hit and when == "after":
                pause()
            return result

        return paused

    if call == "replace":
        os.replace = wrap(os.replace, lambda source, destination, *args, **kwargs: destination)
    elif call == "fsync":
        os.fsync = wrap(
            os.fsync, lambda fd: os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        )
    elif call == "write_text":
        pathlib.Path.write_text = wrap(pathlib.Path.write_text, lambda path, *args, **kwargs: path)
    else:
        raise ValueError(f"ADPA_TEST_PAUSE: unknown call {call!r}")


if os.environ.get("ADPA_TEST_PAUSE"):
    _install(os.environ["ADPA_TEST_PAUSE"], os.environ["ADPA_TEST_PAUSED"])
