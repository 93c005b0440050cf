"""A replica on an SMB share: the :class:`~engine.targets.Target` over smbprotocol (its one importer).

How a put is made durable (measured on Samba 4.17; the same requests are what Windows' own client sends):
1. create a new temporary file (never an existing name), write it, set its mtime, FLUSH (the server makes
   the content durable: smbd fsyncs it), close; every status and byte count checked, and on any failure
   the temp is deleted through its own handle;
2. only then rename it over its final name with ReplaceIfExists (an open, set-info, close compound).
Never all of it in one compound: on a full share Samba still ran the rename and left a torn file.
A folder's entries are made durable by a FLUSH on a handle of the folder opened with add-file rights
(smbd fsyncs the folder; a server that refuses it is logged once and not asked again).

Every call runs on a bounded executor with a deadline; a call past it drops the connection (a hung server
holds a receive for ten minutes otherwise). The next call reconnects with backoff, grows the credit window
(smbprotocol starts at 64 credits and never asks for more) and removes the temporary files the broken
session left. Errors come back as ``OSError`` with a fitting errno (disk full: ENOSPC; connection lost:
ECONNRESET; past the deadline: ETIMEDOUT), so the applier treats every target alike. Renaming over a file
another client holds open is refused with access denied: retried with backoff until the deadline.

The password comes from the config or the environment variable ``STANDBY_SMB_PASSWORD``; it is never
logged and never part of :attr:`SmbTarget.label`.

Must not: decide what to write (the applier's); keep state on the share (the position file and the hash
cache stay in the local state folder).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import smbclient  # type: ignore[import-untyped]
from smbclient._io import (  # type: ignore[import-untyped]
    SMBDirectoryIO,
    SMBFileIO,
    SMBFileTransaction,
    SMBRawIO,
    query_info,
    set_info,
)
from smbprotocol.exceptions import (  # type: ignore[import-untyped]
    DiskFull,
    NoMoreFiles,
    NoSuchFile,
    SMBConnectionClosed,
    SMBException,
    SMBOSError,
    SMBResponseException,
)
from smbprotocol.file_info import (  # type: ignore[import-untyped]
    FileBasicInformation,
    FileDispositionInformation,
    FileInformationClass,
    FileInternalInformation,
    FileRenameInformation,
    FileStandardInformation,
)
from smbprotocol.open import (  # type: ignore[import-untyped]
    CreateOptions,
    FilePipePrinterAccessMask,
    QueryDirectoryFlags,
    SMB2QueryDirectoryResponse,
)

from engine.config import ReceiverConfig, Share
from engine.digest import Hasher
from engine.model import NO_FLAGS, FileMeta, child_of, clamp_ns, is_temp_name
from engine.scan import FileKey, HashCache, Manifest, note_read, wire_mtime
from engine.targets import Capabilities, Kind, Stat, Target

log = logging.getLogger(__name__)

T = TypeVar("T")

#: 1601-01-01 (FILETIME 0) to 1970-01-01, in 100 ns.
EPOCH_FILETIME = 116_444_736_000_000_000
ATTR_DIRECTORY = 0x10
ATTR_REPARSE = 0x400
#: Credits asked for after every connect: 16 writers of 1 MiB chunks at once.
CREDITS = 512
#: Content up to this size is written in one compound request (create, write, mtime, FLUSH, close).
COMPOUND_MAX = 1 << 20
#: How much one folder listing request asks for (the default 64 KiB holds only ~600 entries).
LIST_BUFFER = 65536
#: The largest chunk one request reads or writes.
IO_CHUNK = 1 << 20
#: How long a rename over a file another client holds open is retried (within the call's deadline).
BUSY_RETRY = 5.0

PASSWORD_ENV = "STANDBY_SMB_PASSWORD"

#: A folder entry as a listing gives it: (name, attributes, hash cache key).
Entry = tuple[str, int, FileKey]


def to_filetime(ns: int) -> int:
    return ns // 100 + EPOCH_FILETIME


def from_filetime(ft: int) -> int:
    return (ft - EPOCH_FILETIME) * 100


class SmbTarget(Target):
    def __init__(
        self,
        share: Share,
        username: str,
        password: str,
        *,
        encrypt: bool = False,
        timeout: float = 30.0,
        threads: int = 8,
    ) -> None:
        self.share = share
        self._user = username
        self._password = password
        self._encrypt = encrypt
        self.timeout = timeout
        self._cache: dict[str, Any] = {}  # this target's own connections (not smbclient's global pool)
        # No credentials here: a call that finds the connection gone must fail (smbclient's own logon
        # then fails for want of them), so that the next one reconnects through _ensure, which grows the
        # credit window and removes the broken session's temporary files.
        self._kw: dict[str, Any] = {"port": share.port, "connection_cache": self._cache}
        self._base = share.unc
        self._where = f"{share.server}:{share.port}"
        # FileRenameInformation names the new path from the share's root.
        self._in_share = share.folder.replace("/", "\\")
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="smb")
        self._lock = threading.Lock()
        self._connected = False
        self._gen = 0  # connections made so far: a failure drops only the one it happened on
        #: Temporary files made and not yet placed or removed (removed after a reconnect).
        self._temps: set[str] = set()
        self._temps_lock = threading.Lock()
        self._folder_flush = True
        self.reconnects = 0
        self.caps = Capabilities(
            group_sync=False,
            case_insensitive=True,
            mtime_resolution_ns=100,
            filetime=True,
            short_names=True,
        )

    @classmethod
    def from_config(cls, cfg: ReceiverConfig) -> SmbTarget:
        assert cfg.share is not None
        password = cfg.smb_password or os.environ.get(PASSWORD_ENV, "")
        return cls(
            cfg.share,
            cfg.smb_username,
            password,
            encrypt=cfg.smb_encrypt,
            timeout=cfg.smb_timeout,
            threads=cfg.smb_threads,
        )

    @property
    def label(self) -> str:
        return self.share.url

    def unc(self, rel: str) -> str:
        return self._base + "\\" + rel.replace("/", "\\") if rel else self._base

    def _share_path(self, rel: str) -> str:
        tail = rel.replace("/", "\\")
        return f"{self._in_share}\\{tail}" if self._in_share else tail

    # -- calls, deadlines, reconnects ------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any, gen: int | None = None) -> T:
        """``fn(*args)`` on the executor, connected, within the deadline (counted from when a worker takes
        it up); SMB errors as OSErrors. ``gen``: the connection a handle ``fn`` uses was opened on; if that
        one is gone the call fails at once (the connection now in use is not dropped for it)."""
        return self._call_on(fn, *args, gen=gen)[0]

    def _call_on(self, fn: Callable[..., T], *args: Any, gen: int | None = None) -> tuple[T, int]:
        """:meth:`_call`, and the generation of the connection the call ran on (what a handle it opened
        belongs to)."""
        cur = self._ensure()
        if gen is not None and gen != cur:
            raise OSError(errno.ECONNRESET, f"connection to {self._where} lost (the handle was opened on it)")
        started = threading.Event()

        def run() -> T:
            started.set()
            if self._gen != cur or not self._connected:  # dropped while this call waited for a worker
                raise _Lost("the connection was dropped before the call ran")
            return fn(*args)

        fut = self._pool.submit(run)
        # A call waits for a free worker (every one busy on a slow server) up to a few deadlines; its own
        # deadline starts when it runs.
        if not started.wait(self.timeout * 4) and fut.cancel():
            raise OSError(errno.ETIMEDOUT, f"{self._where}: no free worker in {self.timeout * 4:g} s")
        try:
            return fut.result(timeout=self.timeout), cur
        except FutureTimeout:
            self._drop("deadline", cur)
            raise OSError(errno.ETIMEDOUT, f"no answer from {self._where} in {self.timeout:g} s") from None
        except _Ours:
            raise
        except _Lost as e:
            raise OSError(errno.ECONNRESET, f"connection to {self._where} lost: {e}") from None
        except SMBOSError as e:
            status = int(e.ntstatus)
            if status in _GONE:
                self._drop(f"status 0x{status:08x}", cur)
                raise OSError(errno.ECONNRESET, f"connection to {self._where} lost ({e.strerror})") from None
            if e.errno:
                raise
            code = _ERRNO_OF.get(status, errno.EIO)
            raise OSError(code, f"{self._where}: {_says(code, e.strerror)}", e.filename) from None
        except DiskFull as e:
            raise OSError(errno.ENOSPC, f"{self._where}: the share is full", self.label) from e
        except SMBResponseException as e:
            if int(e.status) in _GONE:
                self._drop(f"status 0x{int(e.status):08x}", cur)
                raise OSError(errno.ECONNRESET, f"connection to {self._where} lost ({e.message})") from None
            code = _errno_of(e)
            raise OSError(code, f"{self._where}: {_says(code, e.message)}") from None
        except (SMBConnectionClosed, ConnectionError, TimeoutError) as e:
            self._drop(type(e).__name__, cur)
            raise OSError(errno.ECONNRESET, f"connection to {self._where} lost: {e}") from None
        except ValueError as e:
            if str(e).startswith("Failed to connect"):  # smbclient found the connection gone, and no server
                self._drop("connect failed", cur)
                raise OSError(errno.ECONNRESET, f"connection to {self._where} lost: {e}") from None
            raise OSError(errno.EIO, f"{self._where}: an answer standby cannot read: {e}") from None
        except OSError as e:
            if e.errno in _SOCKET_GONE:  # the socket itself failed (EBADF, EPIPE, ...)
                self._drop(f"socket: {e}", cur)
                raise OSError(errno.ECONNRESET, f"connection to {self._where} lost: {e}") from None
            raise
        except SMBException as e:
            self._drop(type(e).__name__, cur)
            # smbclient found the connection gone and tried a logon of its own (without credentials: the
            # next call connects again properly), or the credit window of a broken one ran dry, or else
            raise OSError(errno.ECONNRESET, f"connection to {self._where} lost: {e}") from None

    def _ensure(self) -> int:
        """Connected (reconnecting if need be); the connection's generation."""
        if self._connected:
            return self._gen
        with self._lock:
            if self._connected:
                return self._gen
            deadline = time.monotonic() + self.timeout
            delay = 0.2
            while True:
                fut = self._pool.submit(self._connect)
                try:
                    fut.result(timeout=max(0.1, deadline - time.monotonic()))
                    break
                except FutureTimeout:
                    self._forget_connections()
                    raise OSError(errno.ETIMEDOUT, f"cannot reach {self._where}") from None
                except (ValueError, SMBException, OSError) as e:
                    self._forget_connections()
                    if _is_logon_failure(e):
                        raise OSError(errno.EACCES, f"logon refused by {self._where}: {_short(e)}") from None
                    if time.monotonic() + delay >= deadline:
                        raise OSError(errno.ECONNREFUSED, f"cannot connect to {self._where}: {e}") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
            first = self._gen == 0
            # RACE: taken before the new connection is published, so no temp made on it is taken.
            left = [] if first else self._take_temps()
            self._gen += 1
            self._connected = True
            if first:
                return self._gen
            self.reconnects += 1
            log.warning("smb.reconnected target=%s count=%d", self.label, self.reconnects)
        # The temporary files this process made that were neither placed nor removed: the broken session
        # may have left them (a group that still needs one fails and is sent again).
        n = 0
        for i, temp in enumerate(left):
            try:
                n += self._remove_temp(temp)
            except OSError as e:
                with self._temps_lock:  # kept for the next reconnect (or the next start's clean)
                    self._temps.update(left[i:])
                log.warning("smb.temp_left path=%r error=%s (removed later)", temp, e)
                break
        if n:
            log.info("smb.temps_removed count=%d (left by the broken session)", n)
        return self._gen

    def _track(self, temp: str) -> None:
        with self._temps_lock:
            self._temps.add(temp)

    def _untrack(self, temp: str) -> None:
        with self._temps_lock:
            self._temps.discard(temp)

    def _take_temps(self) -> list[str]:
        with self._temps_lock:
            left = sorted(self._temps)
            self._temps.clear()
        return left

    def _connect(self) -> None:
        session = smbclient.register_session(
            self.share.server,
            username=self._user or None,
            password=self._password or None,
            port=self.share.port,
            encrypt=self._encrypt or None,
            connection_timeout=max(1, int(self.timeout)),
            connection_cache=self._cache,
        )
        try:
            session.connection.echo(sid=session.session_id, timeout=self.timeout, credit_request=CREDITS)
        except SMBException as e:  # fewer credits: fewer parallel requests, still correct
            log.info("smb.credits_not_granted error=%s", e)
        smbclient.makedirs(self._base, exist_ok=True, **self._kw)

    def _drop(self, why: str, gen: int) -> None:
        """Let go of the connection of generation ``gen``, found broken or hung (not a newer one another
        thread made meanwhile): its socket is closed without a word to the server (a logoff would wait
        on a hung server), which fails every call still waiting on it."""
        with self._lock:
            if gen != self._gen or not self._connected:
                return
            log.warning("smb.connection_dropped target=%s why=%s", self.label, why)
            self._connected = False
            self._forget_connections()

    def _forget_connections(self) -> None:
        conns = list(self._cache.values())
        self._cache.clear()
        for conn in conns:
            try:
                conn.disconnect(close=False)
            except Exception:  # already closed
                pass

    def close(self) -> None:
        """Log off politely (within the deadline), then let go of the connection and the threads."""
        if self._connected:
            fut = self._pool.submit(
                smbclient.reset_connection_cache, fail_on_error=False, connection_cache=self._cache
            )
            try:
                fut.result(timeout=self.timeout)
            except Exception:  # a broken or hung server: its socket is simply closed below
                pass
        self._connected = False
        self._forget_connections()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- reading ---------------------------------------------------------------------------------------------
    def stat(self, rel: str) -> Stat | None:
        return self._call(self._stat, rel)

    def _stat(self, rel: str) -> Stat | None:
        """One compound: open (the link itself, not what it points to), three small queries, close."""
        raw = SMBRawIO(
            self.unc(rel),
            mode="r",
            share_access="rwd",
            desired_access=FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
            create_options=CreateOptions.FILE_OPEN_REPARSE_POINT,
            **self._kw,
        )
        tr = SMBFileTransaction(raw)
        _query_stat(tr)
        try:
            tr.commit()
        except SMBOSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR) or int(e.ntstatus) == 0xC0000103:  # NOT_A_DIRECTORY
                return None
            raise
        return _stat_of(*tr.results[0:3])

    def read_chunks(self, rel: str) -> Iterator[bytes]:
        raw, gen = self._call_on(self._open_read, rel)
        try:
            while True:
                data = self._call(raw.read, IO_CHUNK, gen=gen)
                if not data:
                    return
                yield data
        finally:
            self._close_quiet(raw)

    def manifest(
        self,
        include: Sequence[str],
        cache: HashCache,
        out: Manifest,
        flag_edits: bool = False,
        need_digest: Callable[[str], bool] | None = None,
        full: bool = False,
    ) -> Iterator[FileMeta]:
        for item in include:
            st = self.stat(item)
            if st is None or st.kind is Kind.LINK:
                continue
            if st.kind is Kind.DIR:
                yield FileMeta(item, is_dir=True)
                yield from self._manifest_dir(item, cache, out, flag_edits, need_digest, full)
            elif st.kind is Kind.FILE:
                meta = self._file_meta(item, st.key, cache, out, flag_edits, need_digest, full)
                if meta is not None:
                    yield meta

    def _manifest_dir(
        self,
        rel: str,
        cache: HashCache,
        out: Manifest,
        flag_edits: bool,
        need_digest: Callable[[str], bool] | None,
        full: bool,
    ) -> Iterator[FileMeta]:
        try:
            entries = self._call(self._list, rel)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return
            log.warning("smb.unreadable_folder path=%r error=%s", rel, e)
            out.unreadable.append(rel)
            return
        for name, attrs, key in entries:
            if is_temp_name(name):
                continue
            child = child_of(rel, name)
            if attrs & ATTR_REPARSE:
                continue
            if attrs & ATTR_DIRECTORY:
                yield FileMeta(child, is_dir=True)
                yield from self._manifest_dir(child, cache, out, flag_edits, need_digest, full)
            else:
                meta = self._file_meta(child, key, cache, out, flag_edits, need_digest, full)
                if meta is not None:
                    yield meta

    def _file_meta(
        self,
        rel: str,
        key: FileKey,
        cache: HashCache,
        out: Manifest,
        flag_edits: bool,
        need_digest: Callable[[str], bool] | None,
        full: bool,
    ) -> FileMeta | None:
        size, mtime = key[0], key[1]
        digest = None if full else cache.get(rel, key)
        if digest is None and need_digest is not None and not need_digest(rel):
            digest = b""
        flags = NO_FLAGS
        if digest is None:
            h = Hasher()
            n = 0
            try:
                for chunk in self.read_chunks(rel):
                    h.update(chunk)
                    n += len(chunk)
                after = self.stat(rel)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return None
                out.unstable.append(rel)
                return None
            if after is None:
                return None
            if after.key[:3] != key[:3] or n != size:
                out.unstable.append(rel)  # changed while it was read
                return None
            digest = h.digest()
            flags = note_read(cache, rel, after.key, digest, full, flag_edits)
        return FileMeta(rel, False, size, wire_mtime(rel, mtime), digest, flags)

    def _list(self, rel: str) -> list[Entry]:
        """The entries of a folder: (name, attributes, hash cache key), from FileIdFullDirectoryInformation
        read from the raw buffer (smbprotocol's parsed times drop the 100 ns digit)."""
        out: list[Entry] = []
        with SMBDirectoryIO(self.unc(rel), share_access="rwd", **self._kw) as d:
            fd = d.fd
            flags = QueryDirectoryFlags.SMB2_RESTART_SCANS
            while True:
                req, _ = fd.query_directory(
                    "*", FileInformationClass.FILE_ID_FULL_DIRECTORY_INFORMATION, flags=flags,
                    max_output=LIST_BUFFER, send=False,
                )  # fmt: skip
                sent = fd.connection.send(
                    req, fd.tree_connect.session.session_id, fd.tree_connect.tree_connect_id
                )
                try:
                    response = fd.connection.receive(sent)
                except (NoMoreFiles, NoSuchFile):
                    break
                qr = SMB2QueryDirectoryResponse()
                qr.unpack(response["data"].get_value())
                out.extend(parse_id_full_directory(qr["buffer"].get_value()))
                flags = 0
        return out

    # -- writing -------------------------------------------------------------------------------------------
    def write_temp(self, temp: str, data: bytes, mtime_ns: int, durable: bool) -> None:
        if len(data) <= COMPOUND_MAX:
            self._call(self._write_compound, temp, data, mtime_ns, durable)
            return
        put = self.begin_put(temp)
        try:
            put.write(data)
            put.seal(mtime_ns, durable)
        except BaseException:
            put.abort()
            raise

    def _write_compound(self, temp: str, data: bytes, mtime_ns: int, durable: bool) -> None:
        """A small put's first round trip as one compound: create, write, set the mtime, FLUSH, close.
        Every status and the byte count are checked; on any failure the temp is deleted by name (the
        compound's close ran whatever failed before it: Samba goes on after a failed request)."""
        raw = self._new_temp(temp)
        self._track(temp)
        tr = SMBFileTransaction(raw)
        raw.open(transaction=tr)
        tr += raw.fd.write(data, 0, send=False)
        set_info(tr, _basic(mtime_ns))
        if durable:
            tr += raw.fd.flush(send=False)
        raw.close(transaction=tr)
        try:
            tr.commit()
        except BaseException:
            try:
                self._unlink_now(temp)
                self._untrack(temp)
            except Exception:  # not created, or the connection is gone: removed after the reconnect
                pass
            raise
        written = tr.results[1]
        if written != len(data):
            self._unlink_now(temp)
            self._untrack(temp)
            raise _Ours(errno.EIO, f"the server wrote {written} of {len(data)} bytes", temp)

    def _open_read(self, rel: str) -> Any:
        raw = SMBFileIO(self.unc(rel), mode="rb", share_access="rwd", **self._kw)
        raw.open()
        return raw

    def begin_put(self, temp: str) -> _SmbPut:
        raw, gen = self._call_on(self._create, temp)
        return _SmbPut(self, temp, raw, gen)

    def _create(self, temp: str) -> Any:
        raw = self._new_temp(temp)
        self._track(temp)
        raw.open()
        return raw

    def _new_temp(self, temp: str) -> Any:
        return SMBFileIO(
            self.unc(temp),
            mode="xb",
            share_access="rwd",
            desired_access=FilePipePrinterAccessMask.FILE_WRITE_DATA
            | FilePipePrinterAccessMask.FILE_WRITE_ATTRIBUTES
            | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES
            | FilePipePrinterAccessMask.DELETE,
            **self._kw,
        )

    def place(self, temp: str, rel: str) -> Stat | None:
        st = self._rename(temp, rel)
        self._untrack(temp)
        return st

    def rename(self, src: str, dst: str) -> None:
        self._rename(src, dst)

    def _rename(self, src: str, dst: str) -> Stat | None:
        end = time.monotonic() + min(BUSY_RETRY, self.timeout)
        delay = 0.05
        while True:
            try:
                return self._call(self._rename_now, src, dst)
            except OSError as e:
                # Another client holds the file at dst open (Windows semantics): it lets go soon.
                if e.errno not in (errno.EACCES, errno.EPERM) or time.monotonic() + delay > end:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _rename_now(self, src: str, dst: str) -> Stat | None:
        """Open, rename with ReplaceIfExists, read what the entry is now (the rename moved its change
        time), close: one compound."""
        raw = SMBRawIO(
            self.unc(src),
            mode="r",
            share_access="rwd",
            desired_access=FilePipePrinterAccessMask.DELETE | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
            create_options=CreateOptions.FILE_OPEN_REPARSE_POINT,
            **self._kw,
        )
        tr = SMBFileTransaction(raw)
        info = FileRenameInformation()
        info["replace_if_exists"] = True
        info["file_name"] = self._share_path(dst).encode("utf-16-le")
        set_info(tr, info)
        _query_stat(tr)
        tr.commit()
        return _stat_of(*tr.results[1:4])

    def remove(self, rel: str) -> None:
        """A file with one call; a folder tree from the client, one call per folder listed and per entry
        removed (a large tree takes as long as it takes, each call within its deadline)."""
        st = self.stat(rel)
        if st is None:
            raise _Ours(errno.ENOENT, "nothing to remove", rel)
        if st.kind is not Kind.DIR:
            self._call(self._unlink_now, rel)
            return
        order: list[str] = []
        for folder, entries in self._walk(rel):
            order.append(folder)
            for name, attrs, _key in entries:
                if not attrs & ATTR_DIRECTORY or attrs & ATTR_REPARSE:
                    self._call(self._unlink_now, child_of(folder, name))
        for folder in reversed(order):  # deepest first
            self._call(lambda f=folder: smbclient.rmdir(self.unc(f), **self._kw))

    def _walk(self, top: str) -> Iterator[tuple[str, list[Entry]]]:
        """Each folder of the tree at ``top`` (``""``: the root) with its entries, parents first, one
        listing call each; links are never entered, and a folder gone meanwhile is passed over."""
        folders = [top]
        while folders:
            folder = folders.pop()
            try:
                entries = self._call(self._list, folder)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                raise
            yield folder, entries
            folders.extend(
                child_of(folder, name)
                for name, attrs, _key in entries
                if attrs & ATTR_DIRECTORY and not attrs & ATTR_REPARSE
            )

    def _unlink_now(self, rel: str) -> None:
        smbclient.remove(self.unc(rel), **self._kw)

    def unlink_quiet(self, rel: str) -> None:
        self._remove_temp(rel)

    def _remove_temp(self, rel: str) -> bool:
        """Remove the file at ``rel`` if it is there (True if it was)."""
        try:
            self._call(self._unlink_now, rel)
            found = True
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            found = False
        self._untrack(rel)
        return found

    def mkdir(self, rel: str) -> None:
        self._call(lambda: smbclient.mkdir(self.unc(rel), **self._kw))

    def makedirs(self, rel: str) -> None:
        self._call(self._makedirs, rel)

    def _makedirs(self, rel: str) -> None:
        """Like ``os.makedirs(exist_ok=True)``: a file standing where a folder must be is an error."""
        try:
            smbclient.mkdir(self.unc(rel), **self._kw)
        except SMBOSError as e:
            if e.errno == errno.EEXIST:
                st = self._stat(rel)
                if st is None or st.kind is not Kind.DIR:
                    raise _Ours(errno.ENOTDIR, "a file stands where a folder must be", rel) from None
                return
            if e.errno != errno.ENOENT or "/" not in rel:
                raise
            self._makedirs(rel.rpartition("/")[0])
            smbclient.mkdir(self.unc(rel), **self._kw)

    def set_mtime(self, rel: str, mtime_ns: int, durable: bool) -> None:
        self._call(self._set_mtime, rel, mtime_ns, durable)

    def _set_mtime(self, rel: str, mtime_ns: int, durable: bool) -> None:
        raw = SMBRawIO(
            self.unc(rel),
            mode="r",
            share_access="rwd",
            desired_access=FilePipePrinterAccessMask.FILE_WRITE_ATTRIBUTES
            | FilePipePrinterAccessMask.FILE_WRITE_DATA,
            create_options=CreateOptions.FILE_NON_DIRECTORY_FILE,
            **self._kw,
        )
        with raw:
            with SMBFileTransaction(raw) as tr:
                set_info(tr, _basic(mtime_ns))
            if durable:
                raw.fd.flush()

    def same_file(self, a: str, b: str) -> bool:
        sa, sb = self.stat(a), self.stat(b)
        return sa is not None and sb is not None and sa.key[2] == sb.key[2] and sa.key[2] != 0

    # -- durability ----------------------------------------------------------------------------------------
    def sync_folders(self, rels: Iterable[str]) -> None:
        if not self._folder_flush:
            return
        for rel in rels:
            try:
                self._call(self._flush_folder, rel)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):  # removed, or a file now, later in the group
                    continue
                if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EACCES):
                    self._folder_flush = False
                    log.warning(
                        "smb.folder_flush_refused target=%s error=%s (folder entries are left to the "
                        "server's own journal)",
                        self.label,
                        e,
                    )
                    return
                raise

    def _flush_folder(self, rel: str) -> None:
        raw = SMBDirectoryIO(
            self.unc(rel),
            mode="r",
            share_access="rwd",
            desired_access=FilePipePrinterAccessMask.FILE_WRITE_DATA  # FILE_ADD_FILE on a folder
            | FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
            **self._kw,
        )
        with raw:
            raw.fd.flush()

    def clean_temps(self) -> int:
        """Every temporary file below the root, removed: one call per folder listed and per file removed,
        each with its own deadline (a large share takes as long as it takes)."""
        n = 0
        for folder, entries in self._walk(""):
            for name, attrs, _key in entries:
                if not attrs & (ATTR_DIRECTORY | ATTR_REPARSE) and is_temp_name(name):
                    self.unlink_quiet(child_of(folder, name))
                    n += 1
        return n

    @staticmethod
    def _close_quiet(raw: Any) -> None:
        try:
            raw.close()
        except Exception:  # a handle on a dead connection: the server closed it already
            _forget(raw)


class _SmbPut:
    """A temporary file on the share, open for writing until sealed."""

    def __init__(self, target: SmbTarget, temp: str, raw: Any, gen: int) -> None:
        self.temp = temp
        self._t = target
        self._raw: Any = raw
        self._gen = gen  # the connection the handle is open on

    def write(self, data: bytes) -> None:
        self._t._call(self._write, data, gen=self._gen)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._raw.write(view[:IO_CHUNK])
            if not n:
                raise _Ours(errno.EIO, "the server wrote nothing", self.temp)
            view = view[n:]

    def seal(self, mtime_ns: int, durable: bool) -> None:
        self._t._call(self._seal, mtime_ns, durable, gen=self._gen)
        self._raw = None

    def _seal(self, mtime_ns: int, durable: bool) -> None:
        with SMBFileTransaction(self._raw) as tr:
            set_info(tr, _basic(mtime_ns))
        if durable:
            self._raw.fd.flush()  # smbd fsyncs the file
        self._raw.close()

    def abort(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None and not raw.closed:
            try:
                self._t._call(self._delete_through, raw, gen=self._gen)
                self._t._untrack(self.temp)
                return
            except OSError:
                _forget(raw)
        try:
            self._t.unlink_quiet(self.temp)
        except OSError as e:  # left for the next start's (or reconnect's) cleaning
            log.warning("smb.temp_left path=%r error=%s", self.temp, e)

    @staticmethod
    def _delete_through(raw: Any) -> None:
        try:
            with SMBFileTransaction(raw) as tr:
                info = FileDispositionInformation()
                info["delete_pending"] = True
                set_info(tr, info)
        finally:
            raw.close()


def _forget(raw: Any) -> None:
    """Count a handle whose connection is gone as closed (the server let go of it with the session)."""
    try:
        raw.fd._connected = False
    except AttributeError:
        pass


class _Ours(OSError):
    """An error this module raises about the share's content (not the connection): passed on as it is."""


class _Lost(Exception):
    """The connection a call was meant for was dropped before it ran."""


#: NT statuses that mean the session, the tree connect or the handle is gone: reconnect.
_GONE = frozenset(
    {
        0xC00000C9,  # STATUS_NETWORK_NAME_DELETED (the share was closed under us)
        0xC0000203,  # STATUS_USER_SESSION_DELETED
        0xC000035C,  # STATUS_NETWORK_SESSION_EXPIRED (Kerberos)
        0xC0000128,  # STATUS_FILE_CLOSED
        0xC000020C,  # STATUS_CONNECTION_DISCONNECTED
    }
)
#: errnos of a socket that failed.
_SOCKET_GONE = frozenset(
    {errno.EBADF, errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN}
)


def _query_stat(tr: Any) -> None:
    """Add the three small queries a :class:`Stat` is made of to a compound (FileAllInformation would do
    in one, but smbprotocol refuses some of the mode bits servers send in it)."""
    query_info(tr, FileBasicInformation)
    query_info(tr, FileStandardInformation)
    query_info(tr, FileInternalInformation)


def _stat_of(basic: Any, standard: Any, internal: Any) -> Stat:
    """The :class:`Stat` of FileBasicInformation, FileStandardInformation and FileInternalInformation."""
    attrs = int(basic["file_attributes"].get_value())
    kind = Kind.LINK if attrs & ATTR_REPARSE else Kind.DIR if attrs & ATTR_DIRECTORY else Kind.FILE
    size = int(standard["end_of_file"].get_value())
    mtime = clamp_ns(from_filetime(int(basic["last_write_time"].get_value())))
    change = clamp_ns(from_filetime(int(basic["change_time"].get_value())))
    atime = clamp_ns(from_filetime(int(basic["last_access_time"].get_value())))
    fid = int(internal["index_number"].get_value())
    return Stat(kind, size, mtime, (size, mtime, fid, change), atime)


def _basic(mtime_ns: int) -> Any:
    """A FileBasicInformation setting only the last write time (zeros leave the others as they are)."""
    info = FileBasicInformation()
    info["creation_time"] = 0
    info["last_access_time"] = 0
    info["last_write_time"] = max(1, to_filetime(mtime_ns))  # 0 would mean "leave it as it is"
    info["change_time"] = 0
    info["file_attributes"] = 0
    return info


_ENTRY = struct.Struct("<IIqqqqqqIIIIQ")  # FileIdFullDirectoryInformation up to its FileName (80 bytes)


def parse_id_full_directory(buf: bytes) -> list[Entry]:
    """The entries of a FileIdFullDirectoryInformation buffer (MS-FSCC 2.4.18): (name, attributes, key),
    "." and ".." left out. A malformed buffer ends the list where it breaks."""
    out: list[Entry] = []
    pos = 0
    while pos + _ENTRY.size <= len(buf):
        nxt, _idx, _ct, _at, wt, cht, eof, _alloc, attrs, nlen, _ea, _res, fid = _ENTRY.unpack_from(buf, pos)
        start = pos + _ENTRY.size
        if start + nlen > len(buf):
            break
        try:
            name = buf[start : start + nlen].decode("utf-16-le", "surrogatepass")
        except UnicodeDecodeError:
            break
        if name not in (".", ".."):
            mtime, change = clamp_ns(from_filetime(wt)), clamp_ns(from_filetime(cht))
            out.append((name, attrs, (eof, mtime, fid, change)))
        if nxt == 0:
            break
        pos += nxt
    return out


#: NT statuses smbprotocol gives no errno (0): the ones a target meets.
_ERRNO_OF = {
    0xC0000022: errno.EACCES,  # STATUS_ACCESS_DENIED (also: renaming over a file another client holds open)
    0xC0000043: errno.EPERM,  # STATUS_SHARING_VIOLATION
    0xC000007F: errno.ENOSPC,  # STATUS_DISK_FULL
    0xC0000056: errno.EACCES,  # STATUS_DELETE_PENDING
    0xC00000BA: errno.EISDIR,  # STATUS_FILE_IS_A_DIRECTORY
    0xC0000033: errno.EINVAL,  # STATUS_OBJECT_NAME_INVALID
    0xC0000010: errno.EOPNOTSUPP,  # STATUS_INVALID_DEVICE_REQUEST
    0xC00000BB: errno.EOPNOTSUPP,  # STATUS_NOT_SUPPORTED
}


def _says(code: int, detail: str) -> str:
    """What an error means, in words, with the server's own status after it."""
    words = "the share is full" if code == errno.ENOSPC else os.strerror(code)
    return f"{words} ({detail})"


def _errno_of(e: Any) -> int:
    try:
        status = int(e.status)
        return int(SMBOSError(status, "").errno or _ERRNO_OF.get(status, errno.EIO))
    except Exception:
        return errno.EIO


def _short(e: BaseException) -> str:
    """The gist of an exception's text (smbprotocol nests its causes in one long line)."""
    text = str(e)
    return text if len(text) <= 200 else text[:200] + "..."


def _is_logon_failure(e: BaseException) -> bool:
    """The server refused the user or password (not: a logon smbclient tried by itself without them, on a
    connection another thread had just let go of)."""
    text = f"{type(e).__name__} {e}"
    if "No username or password" in text:
        return False
    return any(s in text for s in ("LogonFailure", "LOGON_FAILURE", "SMBAuthenticationError", "0xc000006d"))
