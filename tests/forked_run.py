"""The body of a forked test run (see FORKSERVER in conftest.py): `python SCRIPT ARGS` in a process forked from one that
has already imported the heavy libraries. A module of its own, so that the run does not import pytest (tyro, for
one, behaves differently under pytest)."""
import atexit
import os
import runpy
import sys

import numpy


def run_as_main(path, argv, cwd, env, out, err):
    """`python path argv` in `cwd` with environment `env`, its stdout and stderr written to the files `out` and `err`,
    ending as a python process ends: the traceback of an uncaught exception, atexit handlers, the exit status."""
    for fd, file in [(1, out), (2, err)]:
        os.dup2(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    numpy.random.seed()  # else the preloading process's state, shared by every fork (python's `random` reseeds itself)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if not isinstance(exit_.code, (int, type(None))):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
