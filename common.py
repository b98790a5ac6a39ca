"""
common.py -- what prepare_data.py, train.py and evaluate.py all need: messages, atomic file and
folder writes. Standard library only, so importing it costs nothing (`evaluate.py score` never
imports torch) and each script can be forked with just this file beside it.
"""
import json
import os
import shutil
import sys
import tempfile


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def fail(msg):
    """Stop with a one-line message (no traceback): for bad input, not for bugs."""
    raise SystemExit(f"error: {msg}")


def atomic_write(path, write):
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the rest of a team
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")))


def staging_dir(final):
    """An empty folder beside `final` to build it in; replace_dir swaps it in."""
    tmp = final.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def replace_dir(tmp, final):
    """Move a finished folder into place; the old one (if any) is removed only afterwards."""
    old = None
    if os.path.exists(final):
        old = final.rstrip("/") + f".old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old)
