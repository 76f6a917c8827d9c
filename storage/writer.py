"""SQLite's one writer thread, with group commit.

SQLite has one writer at a time, so the store queues its writes for one
thread in arrival order instead of racing for the file lock. What a commit
costs (writing the changed pages to the WAL, a checkpoint now and then) is
mostly the same for one message as for several, so message-path writes
(`rows` jobs, Core statements on a connection) that queued up while the
thread was busy run together in one transaction, committed once. Each job's
caller hears back only after that commit: an accepted message is on disk
before anything else is done with it, as with one transaction per write.

Checkpoints (copying the WAL back into the database file, with an fsync
of each) are the other slow part of a commit: SQLite runs one in whichever
commit finds the WAL past its limit, and that message waits for the disk. A
second thread runs them instead (`PRAGMA wal_checkpoint(PASSIVE)`, which
waits for nobody) every `checkpoint_every` commits; the writer's own
automatic checkpoint stays, at a higher limit (storage.database), in case
that thread falls behind.

If one job of a group fails on its own (a constraint, a bug), the group is
rolled back and its jobs run again one transaction each, so the others do
not share its fate. If the database itself fails (locked by another process
past the busy timeout, disk full), every job of the group gets that error,
as each would have on its own. ORM-session jobs and reads (an in-memory
database has one connection, so its reads come here too) run alone.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import sessionmaker

T = TypeVar("T")

#: What fails a whole group: the database, not one job's statements.
DATABASE_WIDE = (OperationalError, PoolTimeout, OSError)
#: The most jobs one transaction takes.
MAX_GROUP = 64
#: Commits between two checkpoints (a commit adds about 10 pages to the WAL;
#: SQLite's own default is a checkpoint every 1,000 pages).
CHECKPOINT_EVERY = 64
#: A checkpoint after this long even if fewer commits came.
CHECKPOINT_IDLE_S = 5.0
_CHECKPOINT = "PRAGMA wal_checkpoint(PASSIVE)"

Kind = Literal["rows", "session", "read_rows", "read_session"]


@dataclass(slots=True)
class _Job:
    kind: Kind
    work: Callable[[Any], Any]
    future: Future[Any]


_STOP = object()


class Writer:
    def __init__(
        self,
        engine: Engine,
        *,
        max_group: int = MAX_GROUP,
        checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoints: bool = True,
    ) -> None:
        self.engine = engine
        self.max_group = max_group
        self.checkpoint_every = checkpoint_every
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: Transactions committed, and jobs they carried (tests and the bench read them).
        self.commits = 0
        self.jobs = 0
        #: Checkpoints the checkpoint thread ran.
        self.checkpoints = 0
        self._since_checkpoint = 0
        self._wake_checkpointer = threading.Event()
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()
        self._checkpointer: threading.Thread | None = None
        if checkpoints:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
            )
            self._checkpointer.start()

    async def run(self, kind: Kind, work: Callable[[Any], T]) -> T:
        if self._closed:
            raise RuntimeError("the store is closed")
        future: Future[T] = Future()
        self._jobs.put(_Job(kind, work, future))
        return await asyncio.wrap_future(future)

    async def close(self) -> None:
        self._closed = True
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        if self._checkpointer is not None:
            self._stopping = True
            self._wake_checkpointer.set()
            await asyncio.to_thread(self._checkpointer.join)

    # -- the thread -----------------------------------------------------------------

    def _run(self) -> None:
        held: Any = None
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if job is _STOP:
                return
            if job.kind != "rows":
                self._alone(job)
                continue
            group = [job]
            while len(group) < self.max_group:
                try:
                    following = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if following is _STOP or following.kind != "rows":
                    held = following  # keeps its place in the queue's order
                    break
                group.append(following)
            self._together(group)

    def _together(self, group: list[_Job]) -> None:
        live = [job for job in group if job.future.set_running_or_notify_cancel()]
        if len(live) <= 1:
            for job in live:
                self._alone(job, started=True)
            return
        results = []
        try:
            with self.engine.begin() as connection:
                for job in live:
                    results.append(job.work(connection))
        except DATABASE_WIDE as exc:
            for index, job in enumerate(live):  # each its own, so tracebacks don't pile up
                job.future.set_exception(exc if index == 0 else _copy(exc))
            return
        except Exception:
            for job in live:  # rolled back: each again on its own
                self._alone(job, started=True)
            return
        self._committed(len(live))
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)

    def _alone(self, job: _Job, *, started: bool = False) -> None:
        if not started and not job.future.set_running_or_notify_cancel():
            return
        try:
            result = self._execute(job)
        except BaseException as exc:
            job.future.set_exception(exc)
            return
        if job.kind in ("rows", "session"):
            self._committed(1)
        job.future.set_result(result)

    def _committed(self, jobs: int) -> None:
        self.commits += 1
        self.jobs += jobs
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.checkpoint_every:
            self._since_checkpoint = 0
            self._wake_checkpointer.set()

    # -- the checkpoint thread ----------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        last = self.commits
        while not self._stopping:
            self._wake_checkpointer.wait(CHECKPOINT_IDLE_S)
            self._wake_checkpointer.clear()
            if self._stopping or self.commits == last:
                continue
            last = self.commits
            try:
                with self.engine.connect() as connection:
                    connection.exec_driver_sql(_CHECKPOINT)
            except DATABASE_WIDE:
                continue  # the writer's own checkpoint covers for it
            self.checkpoints += 1

    def _execute(self, job: _Job) -> Any:
        if job.kind == "rows":
            with self.engine.begin() as connection:
                return job.work(connection)
        if job.kind == "session":
            with self._sessions.begin() as session:
                return job.work(session)
        if job.kind == "read_rows":
            with self.engine.connect() as connection:
                return job.work(connection)
        with self._sessions() as read_session:
            return job.work(read_session)


def _copy(exc: BaseException) -> BaseException:
    try:
        return copy.copy(exc)
    except Exception:  # an exception that cannot be rebuilt from its arguments
        return exc
