"""Files that survive crashes and full disks.

    atomic_write(path, write_fn, expected_bytes=None, full_hint="")   temp file, fsync, rename, fsync the folder
    WriteError, DiskFullError                                          what a failed write tells the user
    free_bytes(path)                                                   free space on path's filesystem
    RunLock(folder).acquire() / .release(); RunLock.check(folder)       one writer per folder
    remove_stale_temp_files(folder)                                    temp files of writers killed mid-write
    filesystem_type(path)                                              "ext4", "nfs4", ... (Linux; "" elsewhere)
    pid_alive(pid)

A crash at any instant leaves the old file or the new one, never a torn one: the bytes go to a
temp file in the same folder (.NAME.tmpPID), which takes the name only once it is complete and
on disk. A write that fails removes its temp file; one killed mid-write leaves it for
remove_stale_temp_files (checkpoint.py) to clean up once its process is gone.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

from cli import UserError, log

RETRIES = 3  # network filesystems hiccup: a few tries with backoff, then report
RETRY_WAIT_S = 0.5  # doubled after each failed try
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left, quota exceeded
FOREVER_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR)  # retrying cannot help
TEMP_PATTERN = re.compile(r"^\..+\.tmp(\d+)$")  # .NAME.tmpPID: what atomic_write leaves behind when killed


class WriteError(UserError):
    """A file could not be written; the file of that name before the write is untouched."""


class DiskFullError(WriteError):
    """The filesystem (or the user's quota) has no room for the file."""


def temp_path(path):
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def free_bytes(path):
    """Free bytes on the filesystem holding path (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def gib(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


class _RecordingFile:
    """A file whose write errors are remembered: torch.save turns a failed write into a RuntimeError
    that no longer says why ("unexpected pos"), so the errno is read from here instead."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path, write_fn, expected_bytes=None, full_hint=""):
    """Write path through write_fn(file) atomically. A full disk is reported at once as a
    DiskFullError saying how much the file needs (expected_bytes, or at least what was written)
    and how much is free, plus full_hint (what the caller's user can do); other OS errors are
    retried with backoff, then reported as a WriteError."""
    path = Path(path)
    tmp = temp_path(path)
    last_error = None
    for attempt in range(RETRIES):
        f = None
        try:
            with open(tmp, "wb") as raw:
                f = _RecordingFile(raw)
                write_fn(f)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
            return
        except Exception as exc:  # noqa: BLE001  sorted out below: the disk, the filesystem, or a bug
            cause = f.error if f is not None and f.error is not None else exc
            if isinstance(cause, OSError) and cause.errno in FULL_ERRNOS:
                written = tmp.stat().st_size if tmp.exists() else 0
                tmp.unlink(missing_ok=True)
                raise DiskFullError(_full_message(path, cause, written, expected_bytes, full_hint)) from None
            if not isinstance(cause, OSError):  # a bug, not the filesystem: retrying would fail the same way
                raise WriteError(f"could not write {path}: {type(exc).__name__}: {exc}; "
                                 "the file there before, if any, is untouched") from exc
            if cause.errno in FOREVER_ERRNOS:  # a read-only filesystem or a permission stays so: no retrying
                raise WriteError(f"could not write {path}: {cause.strerror}; the file there before, if any, is "
                                 "untouched. Fix the folder's permissions, or write to another folder") from None
            last_error = cause
        finally:
            tmp.unlink(missing_ok=True)  # gone already after os.replace; any other way out leaves no temp file
        if attempt + 1 < RETRIES:
            wait = RETRY_WAIT_S * 2 ** attempt
            log(f"write to {path} failed ({last_error}); retrying in {wait:.1f} s")
            time.sleep(wait)
    raise WriteError(f"could not write {path} after {RETRIES} tries: {last_error}; "
                     "the file there before, if any, is untouched")


def _full_message(path, exc, written, expected_bytes, hint):
    free = free_bytes(path.parent)
    need = f"about {gib(expected_bytes)}" if expected_bytes else f"more than the {gib(written)} written before it stopped"
    reason = "the disk quota is exceeded" if exc.errno == errno.EDQUOT else "the disk is full"
    return (f"could not write {path}: {reason} (it needs {need}, {gib(free)} is free on that filesystem); "
            f"the partial file was removed and the file there before, if any, is untouched. "
            f"{hint or 'Free some space'}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -----------------------------------------------------------------------------
# One trainer per run folder

LOCK_NAME = ".train.lock"
HEARTBEAT_S = 30  # on network filesystems the holder rewrites its lock file this often...
STALE_AFTER_S = 120  # ...and a lock file not rewritten for this long belongs to a machine that is gone
# Where the kernel's file locks may not reach other machines (NFS with local locks, SMB, FUSE
# mounts, parallel filesystems mounted without flock support).
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
                       "9p", "afs", "fuse")
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockError(UserError):
    """Another trainer holds the run folder."""


def filesystem_type(path):
    """The type of the filesystem holding path, from /proc/mounts ("" where that cannot be read)."""
    path = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) >= 3:
                    mount = fields[1].replace("\\040", " ")
                    if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                        best, kind = mount, fields[2]
    except OSError:
        return ""
    return kind


def is_network_filesystem(kind):
    return kind.split(".")[0] in NETWORK_FILESYSTEMS


_HELD = set()  # lock files this process holds: a POSIX lock is lost when the process closes any descriptor of its file


class RunLock:
    """An exclusive lock on a folder, held for the whole run: one trainer per run folder, one
    preparation per shard folder.

    A POSIX record lock (lockf) on <folder>/<name>: the operating system releases it when the process
    dies, so after kill -9, a power cut or a pre-emption the next run starts with no clean-up; and,
    unlike flock, processes the holder forks (data workers, compile workers) do not inherit it. The
    file also says who holds it (host, pid, since when) for the refusal message. On a network
    filesystem the kernel's lock may be local to each machine, so the holder also rewrites the file
    every HEARTBEAT_S seconds from a background thread, and a holder on another machine counts as
    alive while that heartbeat is younger than STALE_AFTER_S. Costs nothing per step."""

    def __init__(self, folder, name=LOCK_NAME, holder="trainer", other="another --log_dir"):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what, self.other = holder, other
        self._fd = None
        self._stop = threading.Event()
        self._thread = None

    @classmethod
    def check(cls, folder, **kwargs):
        """Raise RunLockError if another process holds folder; creates and changes nothing."""
        lock = cls(folder, **kwargs)
        if not lock.path.is_file() or str(lock.path.resolve()) in _HELD:
            return
        try:
            fd = os.open(lock.path, os.O_RDWR)
        except OSError:
            return
        try:
            lock._take(fd)
        finally:
            os.close(fd)  # releases what _take got: this was only a look

    def acquire(self):
        """Take the lock, after checking the folder can be written: a read-only or unwritable folder is found
        here, before any step is trained, not at the first save."""
        probe = self.folder / f".write_probe{os.getpid()}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")  # a file created and removed: the folder takes new files
            probe.unlink()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WriteError(f"cannot write to {self.folder}: {exc.strerror}; use a folder this user can write to "
                             f"({self.other}), or fix its permissions") from None
        try:
            os_lock, kind = self._take(self._fd)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        _HELD.add(str(self.path.resolve()))
        self._write({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "heartbeat": time.time()})
        if not os_lock or is_network_filesystem(kind):
            why = "its filesystem has no file locks" if not os_lock else f"it is on a network filesystem ({kind})"
            log(f"lock: {self.folder} {'has' if os_lock else 'gets'} a heartbeat lock as well, as {why}: another "
                     f"machine's {self.what} is refused while this one's heartbeat (every {HEARTBEAT_S} s) is younger "
                     f"than {STALE_AFTER_S} s")
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _take(self, fd):
        """Lock fd: (whether the OS lock works here, the filesystem type), or a RunLockError naming the holder."""
        import fcntl

        os_lock = True
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLockError(self._held_message(self._holder(fd), "")) from None
            if exc.errno not in NO_LOCKS:
                raise
            os_lock = False
        holder = self._holder(fd)
        kind = filesystem_type(self.folder)
        if holder.get("pid") and (not os_lock or is_network_filesystem(kind)):
            age = time.time() - holder.get("heartbeat", 0)
            other_machine = holder.get("host") != socket.gethostname()
            alive = age < STALE_AFTER_S if other_machine else holder["pid"] != os.getpid() and pid_alive(holder["pid"])
            if alive:
                note = (f" (its heartbeat is {age:.0f} s old; on this {kind or 'lock-less'} filesystem a lock counts as "
                        f"released {STALE_AFTER_S} s after its last heartbeat)" if other_machine else "")
                raise RunLockError(self._held_message(holder, note))
        return os_lock, kind

    def _held_message(self, holder, note):
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, running since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}" if holder else "another process")
        return (f"{self.folder} is in use by another {self.what} ({who}){note}: two of them in one folder overwrite "
                f"each other's files. Stop that one, wait for it to finish, or use {self.other}")

    @staticmethod
    def _holder(fd):
        """Who the lock file names, read through fd: opening and closing the file again would drop the lock."""
        try:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            holder = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _write(self, info):
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)  # in place: the lock lives on this inode, a rename would lose it
        os.fsync(self._fd)

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a network hiccup: the next beat tries again
                self._write({**self._holder(self._fd), "heartbeat": time.time()})

    def release(self):
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            self._write({"released": time.time()})
        os.close(self._fd)  # releases the lock
        self._fd = None
        _HELD.discard(str(self.path.resolve()))

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_stale_temp_files(folder):
    """Delete the temp files of atomic writes whose process is gone (killed mid-write); returns their names."""
    removed = []
    for path in Path(folder).iterdir() if Path(folder).is_dir() else []:
        m = TEMP_PATTERN.match(path.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)
