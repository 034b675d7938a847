"""Running a piece of a test as an unprivileged user, for what a shared filesystem refuses."""

from __future__ import annotations

import gettext  # noqa: F401 - imported here: the child may not read the interpreter's own folder
import locale  # noqa: F401
import os
import json
import sys
import traceback

import pytest


def as_another_user(fn):
    """fn() with the file permissions of an unprivileged user, in a forked child: root (which every
    permission lets through) takes the user id of `nobody` there, where no other thread of this process
    (Ray's) is touched. Elsewhere the test skips: the files it made are its own user's."""
    if os.geteuid() != 0:
        pytest.skip("running a part as another user needs root")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            with os.fdopen(write_end, "w") as out:  # JSON: the results are strings, numbers and rows
                json.dump(fn(), out)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as got:
        data = got.read()
    assert os.waitpid(child, 0)[1] == 0, "the child failed: its traceback is above"
    return json.loads(data)
