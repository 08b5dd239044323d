"""
Writing files so that nothing a user has is ever half-written: each goes to a temp file beside it, then
os.replace puts it in place (atomic on POSIX); on any failure the previous file is untouched. A full disk (or
quota, or file-size limit) is a UserError that names the file and the space it needed, not a traceback.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile

from configurator import UserError

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_UMASK = os.umask(0o022)  # read the process umask (the only way is to set it) and put it back
os.umask(_UMASK)


def no_room(e):
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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the finished file gets the usual permissions
        os.replace(tmp, path)
    except Exception as e:
        if not no_room(e):
            raise
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        need = f"{size / 2**30:.2f} GiB" if size else f"more than the {written / 2**30:.2f} GiB written"
        raise UserError(f"no space left writing {path}: it needs {need}, {shutil.disk_usage(folder).free / 2**30:.2f} "
                        f"GiB are free there; free some space and run again (the previous file is untouched)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# atomic_path's temp names: mkstemp(prefix=".NAME.", suffix=".tmp") puts 8 of [a-z0-9_] between them
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp", re.DOTALL)  # (DOTALL: a file's name may hold a newline)


def remove_temps(folder, keep=()):
    """Remove the temp files that atomic_path leaves when its process dies mid-write (kill -9, a power cut):
    regular files named .NAME.XXXXXXXX.tmp under folder, and nothing else. Call it with the folder's lock held, so
    that no live run is writing them. Folders in keep (a cache another run may be writing) and symlinked folders
    are not entered. Prints and returns what it removed."""
    keep = {os.path.realpath(k) for k in keep}
    if os.path.realpath(folder) in keep:
        return []
    removed = []
    for root, dirs, names in os.walk(folder):  # (os.walk does not follow symlinked folders)
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) not in keep]
        for name in names:
            path = os.path.join(root, name)
            try:
                if not (_TEMP_NAME.fullmatch(name) and stat.S_ISREG(os.lstat(path).st_mode)):
                    continue
                os.remove(path)
            except FileNotFoundError:  # gone meanwhile
                continue
            removed.append(path)
            print(f"removed {path}: a temp file left by a write that did not finish")
    return removed


def write_bytes(path, data):
    with atomic_path(path, len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, **kw):
    write_text(path, json.dumps(obj, **kw))


def make_dir(folder, key):
    """Create folder (and its parents) now, before any heavy work, so that a file in the way, a missing
    permission or a read-only disk is one line naming the config key, not a traceback hours later."""
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as e:
        raise UserError(f"cannot write to {folder} (--{key}): {e.strerror}; pick another folder") from None


def lock(folder):
    """Take folder/.lock, so that two runs never write the same folder; returns the open file, which holds the
    lock until this process ends. An flock: the kernel releases it however the process ends (kill -9 included)."""
    import fcntl
    make_dir(folder, "out_dir")
    try:
        f = open(os.path.join(folder, ".lock"), "a+")
    except OSError as e:  # a read-only disk
        raise UserError(f"cannot write to {folder} (--out_dir): {e.strerror}; pick another folder") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{folder} is in use by another run ({holder}); wait for it to end or pick another --out_dir")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f
