"""
Writing files so that nothing a user has is ever half-written: every file goes to a temp file with a unique
name in the same folder, then os.replace puts it in place (atomic on POSIX). Whatever goes wrong on the way,
the temp file is removed and the previous file, if any, is untouched. A full disk (or quota, or file-size
limit) is a UserError that names the file and the space it needed, not a traceback from deep in a writer.
"""
import contextlib
import errno
import json
import os
import shutil
import tempfile

from configurator import UserError

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _no_room(e):
    """True if e (or what caused it) is a write that failed for lack of space."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            return True
        if "No space left on device" in str(e) or "File too large" in str(e):
            return True  # torch.save's C++ writer reports the OSError as a RuntimeError with its text
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def atomic_path(path, size=None):
    """Yields a fresh temp path beside `path`; when the block ends normally it replaces `path`, otherwise it
    is deleted. size: bytes the file will need, for the disk-full message (else the bytes written so far)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        if not _no_room(e):
            raise
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        need = f"{size / 2**30:.2f} GiB" if size else f"more than the {written / 2**30:.2f} GiB written"
        raise UserError(f"no space left writing {path}: it needs {need}, {shutil.disk_usage(folder).free / 2**30:.2f} "
                        f"GiB are free there; free some space and run again (the previous file is untouched)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path, data):
    with atomic_path(path, len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, **kw):
    write_text(path, json.dumps(obj, **kw))
