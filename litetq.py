"""litetq: a durable background-task queue in one file, on SQLite and the standard library.

    producer (.delay(), q.enqueue(), cron) --> SQLite file (jobs, cron table, messages)
        --> supervisor (python -m litetq worker: cron, leases, timeouts)
        --> worker processes (claim a step, run it, commit its outcome) --> results

Every step of a job is committed before the next begins, so a killed worker loses
nothing: its lease lapses and another worker runs the step again.
"""

import argparse
import base64
import bisect
import calendar
import collections
import contextlib
import contextvars
import datetime
import functools
import hashlib
import hmac
import http.server
import importlib
import ipaddress
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import zoneinfo

__version__ = "0.1.0"
__all__ = [
    "Cancelled",
    "Context",
    "Cron",
    "Error",
    "Expired",
    "Fatal",
    "Job",
    "Message",
    "NotFound",
    "Queue",
    "Retry",
    "Task",
    "TaskFailed",
    "chain",
    "consumer",
    "current",
    "deserialize_task",
    "dumps",
    "http_post",
    "loads",
    "main",
    "make_web_server",
    "periodic",
    "serve_web",
    "task",
    "use",
]

logger = logging.getLogger("litetq")
logger.addHandler(logging.NullHandler())


# --- Constants ---------------------------------------------------------------

UNFINISHED = ("queued", "running", "waiting")
TERMINAL = ("complete", "failed", "cancelled", "expired")
DEFAULT_LEASE = 10.0  # seconds a claimed step stays ours without renewal
MAX_RETRY_DELAY = 3600.0
MAX_LOST = 3  # a step whose worker died this many times fails as "worker lost"
WAIT_POLL = 0.01  # seconds between cheap checks for another process's commits
SCHEMA_VERSION = 1
CHAIN = "litetq.chain"


# --- Exceptions --------------------------------------------------------------

class Error(Exception):
    """Base class of every error litetq raises."""


class NotFound(Error, LookupError):
    """No job with that id."""


class TaskFailed(Error):
    """A job failed; `.error` is its message, `.traceback` the remote traceback text."""

    def __init__(self, job_id, error, traceback=None):
        super().__init__(f"job {job_id} failed: {error}")
        self.job_id, self.error, self.traceback = job_id, error, traceback


class Cancelled(Error):
    """The job was cancelled."""


class Expired(Error):
    """The job waited longer than its ttl and never ran."""


class Fatal(Error):
    """Raise inside a task to fail its job at once, whatever retries remain."""


class Retry(Error):
    """Raise inside a task to ask for another attempt, after `delay` seconds or the backoff."""

    def __init__(self, delay=None):
        super().__init__("retry requested" if delay is None else f"retry requested in {delay} s")
        self.delay = delay


# --- The codec: JSON with task references ------------------------------------

RESERVED = "__litetq__"  # marks encoded Tasks, and escapes user dicts that use the key
ALLOWED = "None, bool, int, float, str, list, tuple, dict with str keys and Task"


class _Unencodable(Exception):
    """Internal: carries the offending value up the stack while the path is built."""

    def __init__(self, value, step=""):
        self.value, self.path = value, [step] if step else []


def _encode(value):
    """Return `value` as plain JSON data; Tasks and reserved-key dicts get wrapped."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _Unencodable(value)
        return value
    if kind is list or kind is tuple:
        return [_encode_at(item, f"[{i}]") for i, item in enumerate(value)]
    if kind is dict:
        return _encode_dict(value)
    if isinstance(value, dict):  # OrderedDict, defaultdict: stored as plain dicts
        return _encode_dict(value)
    if isinstance(value, (list, tuple)):  # namedtuples come back as lists, like tuples
        return [_encode_at(item, f"[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Task):
        return {RESERVED: "task", "name": value.name,
                "args": _encode_at(list(value.args), ".args"),
                "kwargs": _encode_at(value.kwargs, ".kwargs")}
    if isinstance(value, int):  # IntEnum and friends are stored as their plain value
        return int(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        return _encode(float(value))
    raise _Unencodable(value)


def _encode_at(value, step):
    try:
        return _encode(value)
    except _Unencodable as exc:
        exc.path.append(step)
        raise


def _encode_dict(value):
    out = {}
    for key, item in value.items():
        if type(key) is not str:
            raise _Unencodable(key, f"[{key!r}] (a dict key)")
        out[key] = _encode_at(item, f"[{key!r}]")
    if RESERVED in value:  # a user dict that looks like ours: escape it as pairs
        return {RESERVED: "dict", "items": [[k, v] for k, v in out.items()]}
    return out


def _decode_hook(obj):
    marker = obj.get(RESERVED)
    if marker == "task":
        return Task(obj["name"], obj["args"], obj["kwargs"])
    if marker == "dict":
        return dict(obj["items"])
    return obj


def _dumps(obj, where):
    try:
        data = _encode(obj)
    except _Unencodable as exc:
        path = where + "".join(reversed(exc.path))
        raise TypeError(
            f"cannot store {type(exc.value).__name__} {_short_repr(exc.value)} at {path}: "
            f"litetq stores values as JSON ({ALLOWED})") from None
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _short_repr(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def dumps(obj):
    """Encode `obj` as litetq's JSON, with Task references at any depth."""
    return _dumps(obj, "value")


def loads(text):
    """Decode litetq's JSON; encoded Task references come back as `Task` objects."""
    return json.loads(text, object_hook=_decode_hook)


def deserialize_task(obj):
    """Return a Task given a Task, or its encoded form as a dict or JSON string."""
    if isinstance(obj, Task):
        return obj
    if isinstance(obj, (str, bytes)):
        obj = loads(obj)
    if isinstance(obj, dict) and obj.get(RESERVED) == "task":
        obj = loads(json.dumps(obj))  # decodes the task references inside it too
    elif isinstance(obj, dict) and "name" in obj:  # a hand-made {"name", "args", "kwargs"}
        obj = Task(obj["name"], obj.get("args", ()), obj.get("kwargs") or {})
    if not isinstance(obj, Task):
        raise TypeError(f"not an encoded task reference: {_short_repr(obj)}")
    return obj


# --- Tasks -------------------------------------------------------------------

_registry = {}   # task name -> TaskFunction
_consumers = {}  # raw payload queue name -> function(payload)
_periodic = []   # (spec, name, tz, queue, TaskFunction) written to the cron table by workers


class Task:
    """A reference to one call of a registered task: a value that runs nothing by itself."""

    __slots__ = ("name", "args", "kwargs")

    def __init__(self, name, args=(), kwargs=None):
        self.name, self.args, self.kwargs = name, tuple(args), dict(kwargs or {})

    def __eq__(self, other):
        if not isinstance(other, Task):
            return NotImplemented
        return (self.name, list(self.args), self.kwargs) == (
            other.name, list(other.args), other.kwargs)

    def __hash__(self):
        return hash(dumps(self))

    def __repr__(self):
        parts = [repr(a) for a in self.args]
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name.rpartition('.')[2]}({', '.join(parts)})"

    def run_once(self):
        """Run the function once, here, and return what it returns (maybe a Task)."""
        function = _lookup_task(self.name)
        token = _current.set(Context())
        try:
            return function.func(*self.args, **self.kwargs)
        finally:
            _current.reset(token)

    def run(self):
        """Run here, following continuations and chains, to a final value."""
        call, rest = _flatten(self, [])
        while True:
            value = call.run_once()
            call, rest, value = _advance(value, rest)
            if call is None:
                return value


def _flatten(call, rest):
    """Unwrap chains: return the first plain call to run and the calls that follow it."""
    while call is not None and call.name == CHAIN:
        calls = list(call.args[0]) if len(call.args) == 1 and isinstance(
            call.args[0], (list, tuple)) else list(call.args)
        call, rest = (calls[0], calls[1:] + rest) if calls else (None, rest)
    return call, rest


def _advance(value, rest):
    """After a step returned `value`: (next call, calls after it, final value if done)."""
    call = None
    if isinstance(value, Task):
        call, rest = _flatten(value, rest)
    while call is None and rest:  # the current call is final: the chain moves on
        call, rest = _flatten(rest[0], rest[1:])
    return call, rest, value


class TaskFunction:
    """What `@task` returns: calling it makes a `Task`; `.delay()` enqueues one."""

    def __init__(self, func, name, queue, priority, retries, retry_delay, timeout, atomic, ttl):
        functools.update_wrapper(self, func)
        self.func, self.name, self.queue, self.priority = func, name, queue, priority
        self.retries, self.retry_delay, self.timeout = retries, retry_delay, timeout
        self.atomic, self.ttl = atomic, ttl

    def __call__(self, *args, **kwargs):
        return Task(self.name, args, kwargs)

    def delay(self, *args, **kwargs):
        """Enqueue a call on the default queue (see `use()`); returns its `Job`."""
        return _default_queue().enqueue(Task(self.name, args, kwargs))

    def __repr__(self):
        return f"<task {self.name}>"


def task(func=None, *, name=None, queue="default", priority=0, retries=0, retry_delay=1.0,
         timeout=None, atomic=False, ttl=None):
    """Register a function as a task: `@task` or `@task(retries=3, timeout=30, ...)`."""
    def register(func):
        task_name = name or f"{_module_name(func)}.{func.__qualname__}"
        existing = _registry.get(task_name)
        if existing and not _same_function(existing.func, func):
            raise ValueError(f"task name {task_name!r} is already used by "
                             f"{existing.func.__module__}.{existing.func.__qualname__}; "
                             f"give one of them @task(name=...)")
        wrapper = TaskFunction(func, task_name, queue, priority, retries, retry_delay,
                               timeout, atomic, ttl)
        _registry[task_name] = wrapper
        return wrapper
    return register(func) if func is not None else register


def _module_name(func):
    """A script run as __main__ names its tasks after its file, so workers can import it."""
    if func.__module__ != "__main__":
        return func.__module__
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    path = getattr(main, "__file__", None)
    return os.path.splitext(os.path.basename(path))[0] if path else "__main__"


def _same_function(a, b):
    """True for the same function seen again (a module imported twice, or reloaded)."""
    return a is b or (a.__qualname__ == b.__qualname__ and
                      a.__code__.co_filename == b.__code__.co_filename)


def _lookup_task(name):
    """The registered TaskFunction for `name`, importing its module on first use."""
    function = _registry.get(name)
    problem = ""
    if function is None and "." in name:
        module = name.rpartition(".")[0]
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # not a module: the message below says what to do
        except Exception as exc:  # a module that fails at import must not stop the worker
            problem = f"; importing {module} raised {type(exc).__name__}: {exc}"
        function = _registry.get(name)
    if function is None:
        raise Error(f"unregistered task {name!r} (start the worker with --import MODULE)"
                    + problem)
    return function


def periodic(spec, *, name=None, tz=None, queue=None, **task_options):
    """Register a task that the workers' cron runs on `spec` (see `Cron`)."""
    Cron(spec, tz)  # a bad spec fails at import, not in the worker
    def register(func):
        function = func if isinstance(func, TaskFunction) else task(func, **task_options)
        _periodic.append((spec, name or function.name, tz, queue, function))
        return function
    return register


def consumer(queue_name):
    """Register `f(payload)` as the consumer of a raw payload queue, run by workers."""
    def register(func):
        _consumers[queue_name] = func
        return func
    return register


@task(name=CHAIN)
def chain(*calls):
    """Run the calls in order, each to its final value; the result is the last one's.

    Queued, every call is a step (a continuation) of the same job; this body only runs
    for `chain(...).run_once()`.
    """
    if len(calls) == 1 and isinstance(calls[0], (list, tuple)):
        calls = calls[0]
    value = None
    for call in calls:
        value = deserialize_task(call).run()
    return value



@task(name="litetq.http_post", retries=5)
def http_post(url, data, headers=None, timeout=10):
    """POST `data` as JSON; the result is {"status", "body"} (body cut at 64 KiB).
    A non-2xx answer or a network error fails the attempt."""
    import urllib.request  # here, not at the top: it loads ssl and email, ~2 MB per process
    request = urllib.request.Request(
        url, data=json.dumps(data).encode(), method="POST",
        headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read(65536)
    except urllib.error.HTTPError as exc:
        raise Error(f"POST {url} answered {exc.code} {exc.reason}") from None
    if not 200 <= status < 300:
        raise Error(f"POST {url} answered {status}")
    return {"status": status, "body": body.decode("utf-8", "replace")}

# --- Storage: every SQL statement litetq runs --------------------------------

SCHEMA = """
create table if not exists litetq_meta (key text primary key, value text not null);
create table if not exists litetq_jobs (
    id integer primary key,
    queue text not null,
    priority integer not null default 0,
    status text not null,
    name text not null,            -- task name of the current step
    args text not null,            -- codec JSON [args, kwargs] of the current step
    rest text,                     -- codec JSON list of calls a chain runs after this one
    due real not null,             -- not before this epoch time
    expires real,                  -- ttl: expire instead of running after this
    unique_key text,
    attempts integer not null default 0,
    steps integer not null default 1,
    lost integer not null default 0,  -- times a worker died holding the current step
    worker text,
    lease_until real,
    started real,                  -- claim time of the current step, also the claim token
    cancel integer not null default 0,
    parent_id integer,
    resume text,                   -- while waiting on subtasks: 'continue' or 'complete'
    result text,
    error text,
    traceback text,
    progress text,
    created real not null,
    finished real
);
create index if not exists litetq_jobs_next on litetq_jobs (priority desc, due, id)
    where status = 'queued';
create index if not exists litetq_jobs_lease on litetq_jobs (lease_until)
    where status = 'running';
create index if not exists litetq_jobs_parent on litetq_jobs (parent_id)
    where parent_id is not null;
create unique index if not exists litetq_jobs_unique on litetq_jobs (unique_key)
    where unique_key is not null and status in ('queued', 'running', 'waiting');
create table if not exists litetq_logs (
    id integer primary key, job_id integer not null, time real not null,
    level text not null, message text not null);
create index if not exists litetq_logs_job on litetq_logs (job_id);
create table if not exists litetq_messages (
    id integer primary key, queue text not null, payload text not null,
    visible real not null, deliveries integer not null default 0);
create index if not exists litetq_messages_next on litetq_messages (queue, visible, id);
create table if not exists litetq_cron (
    name text primary key, spec text not null, task text not null, tz text, queue text,
    next_run real not null, last_run real);
create table if not exists litetq_cron_fired (
    name text not null, fire_time real not null, job_id integer not null,
    primary key (name, fire_time));
create table if not exists litetq_workers (
    id text primary key, host text not null, pid integer not null, queues text,
    concurrency integer, started real not null, heartbeat real not null);
"""

JOB_COLUMNS = ("id, queue, priority, status, name, args, rest, due, expires, unique_key, "
               "attempts, steps, lost, worker, lease_until, started, cancel, parent_id, "
               "resume, result, error, traceback, progress, created, finished")
CLAIM_COLUMNS = "id, name, args, rest, attempts, expires, started, priority, due"
Claim = collections.namedtuple("Claim", CLAIM_COLUMNS)  # `started` is the claim's token
# A job row is (queue, priority, name, args, due, created), followed, when any is set,
# by (rest, expires, unique_key, parent_id): most jobs need the short insert, which
# is half again as fast in enqueue_many.
INSERT_PLAIN = ("insert into litetq_jobs (queue, priority, name, args, due, created, status) "
                "values (?, ?, ?, ?, ?, ?, 'queued')")
INSERT_JOB = ("insert into litetq_jobs (queue, priority, name, args, due, created, rest, "
              "expires, unique_key, parent_id, status) "
              "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')")

_fork_generation = 0  # bumped in a forked child: inherited connections must not be used


def _after_fork():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


def _insert_sql(row):
    return INSERT_JOB if len(row) > 6 else INSERT_PLAIN


def _unique_key(row):
    return row[8] if len(row) > 6 else None


class _NoLock:
    """Stands in for the lock of ":memory:": file connections are per thread."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def acquire(self):
        return True

    def release(self):
        pass


class Storage:
    """The SQLite backend: connections, transactions and every query litetq makes.

    Each thread gets its own connection to a file; ":memory:" has one shared connection
    behind a lock, since each connection to ":memory:" is a separate database.
    """

    def __init__(self, path, synchronous="NORMAL", busy_timeout=10.0):
        if str(synchronous).upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        self.path, self.synchronous, self.busy_timeout = str(path), synchronous, busy_timeout
        self.memory = self.path == ":memory:"
        self._local = threading.local()
        self._connections = []
        self.lock = threading.RLock() if self.memory else _NoLock()
        self._shared = self._connect() if self.memory else None
        self._create_schema()

    # Connections and transactions.

    def _connect(self):
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("pragma journal_mode = wal")
            conn.execute(f"pragma synchronous = {self.synchronous}")
            # Truncate the WAL after checkpoints so a busy queue's file stays small.
            conn.execute("pragma journal_size_limit = 16777216")
        except sqlite3.DatabaseError as exc:
            raise Error(f"cannot open {self.path!r} as a litetq database: {exc}") from None
        self._connections.append(conn)
        return conn

    @property
    def conn(self):
        if self._shared is not None:
            return self._shared
        local = self._local
        if getattr(local, "generation", None) != _fork_generation:
            local.conn, local.generation = self._connect(), _fork_generation
        return local.conn

    @contextlib.contextmanager
    def write(self):
        """A short BEGIN IMMEDIATE transaction; nested inside an open one as a savepoint."""
        with self.lock:
            conn = self.conn
            if conn.in_transaction:
                conn.execute("savepoint litetq")
                try:
                    yield conn
                except BaseException:
                    conn.execute("rollback to litetq")
                    raise
                finally:
                    conn.execute("release litetq")
                return
            try:
                conn.execute("begin immediate")
            except sqlite3.OperationalError as exc:
                raise Error(f"{self.path}: {exc} (another process held the write lock "
                            f"for over {self.busy_timeout:g} s)") from None
            try:
                yield conn
            except BaseException:
                conn.execute("rollback")
                raise
            conn.execute("commit")

    def begin_step(self):
        """Open an atomic step's transaction on this thread's connection and return the
        connection; ":memory:"'s shared connection stays locked until end_step()."""
        self.lock.acquire()
        try:
            self.conn.execute("begin immediate")
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def end_step(self, conn, commit):
        try:
            if conn.in_transaction:  # unless the task committed it itself
                conn.execute("commit" if commit else "rollback")
        finally:
            self.lock.release()

    def read(self, sql, params=()):
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def read_one(self, sql, params=()):
        with self.lock:
            return self.conn.execute(sql, params).fetchone()

    def data_version(self):
        """Changes whenever another connection commits (PRAGMA data_version)."""
        with self.lock:
            return self.conn.execute("pragma data_version").fetchone()[0]

    def close(self):
        for conn in self._connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._connections.clear()
        self._local = threading.local()
        self._shared = None

    def _create_schema(self):
        with self.write() as conn:
            try:
                conn.execute("create table if not exists litetq_meta "
                             "(key text primary key, value text not null)")
            except sqlite3.DatabaseError as exc:
                raise Error(f"cannot open {self.path!r} as a litetq database: {exc}") from None
            row = conn.execute("select value from litetq_meta where key = 'schema'").fetchone()
            if row and int(row[0]) > SCHEMA_VERSION:
                raise Error(f"{self.path} holds a litetq schema version {row[0]}, newer than "
                            f"this litetq {__version__} knows ({SCHEMA_VERSION}): upgrade litetq")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("insert or replace into litetq_meta values ('schema', ?)",
                         (str(SCHEMA_VERSION),))

    # Enqueueing.

    def insert_jobs(self, rows, conn=None):
        """Insert job rows (see INSERT_JOB); return their ids. Through `conn`: no commit."""
        if conn is not None:
            return [self._insert_unique(conn, row) for row in rows]
        if len(rows) == 1 and not _unique_key(rows[0]):  # one row: autocommit is atomic
            with self.lock:
                return [self.conn.execute(_insert_sql(rows[0]), rows[0]).lastrowid]
        with self.write() as conn:
            if any(_unique_key(row) for row in rows):
                return [self._insert_unique(conn, row) for row in rows]
            if any(len(row) > 6 for row in rows):
                conn.executemany(INSERT_JOB, [row + (None,) * (10 - len(row)) for row in rows])
            else:
                conn.executemany(INSERT_PLAIN, rows)
            # Rows inserted in one write transaction get consecutive rowids, each the
            # largest so far plus one (https://sqlite.org/autoinc.html).
            last = conn.execute("select last_insert_rowid()").fetchone()[0]
            return list(range(last - len(rows) + 1, last + 1))

    @staticmethod
    def _insert_unique(conn, row):
        key = _unique_key(row)
        if key is not None:
            found = conn.execute(
                "select id from litetq_jobs where unique_key = ? "
                "and status in ('queued', 'running', 'waiting')", (key,)).fetchone()
            if found:
                return found[0]
        return conn.execute(_insert_sql(row), row).lastrowid

    # Claiming and finishing steps.

    def claim(self, worker, lease, queues=None, limit=1):
        """Take up to `limit` due steps, in queue order: a list of `Claim`s.
        Steps whose ttl ran out are marked expired instead.

        One UPDATE ... RETURNING in autocommit: a write statement takes the write lock
        before it reads, so two workers can never claim the same row."""
        where = "status = 'queued' and due <= :now"
        names = {f"q{i}": name for i, name in enumerate(queues or ())}
        if names:
            where += f" and queue in ({', '.join(':' + key for key in names)})"
        sql = (f"update litetq_jobs set status = 'running', worker = :worker, "
               f"lease_until = :lease, attempts = attempts + 1, started = :now "
               f"where id in (select id from litetq_jobs where {where} "
               f"order by priority desc, due, id limit :limit) returning {CLAIM_COLUMNS}")
        while True:  # until a claim holds a step that has not expired, or none is due
            now = time.time()
            with self.lock:
                rows = self.conn.execute(sql, {"now": now, "worker": worker, "limit": limit,
                                               "lease": now + lease, **names}).fetchall()
            rows = sorted(map(Claim._make, rows),  # RETURNING has no order
                          key=lambda row: (-row.priority, row.due, row.id))
            expired = [row.id for row in rows if row.expires is not None and row.expires < now]
            if expired:
                with self.write() as conn:
                    for job_id in expired:  # never begun: the claim was no attempt
                        conn.execute("update litetq_jobs set attempts = attempts - 1 "
                                     "where id = ?", (job_id,))
                        self._end(conn, job_id, "expired", now, only_if="running",
                                  error="expired: waited longer than its ttl")
            live = [row for row in rows if row.id not in expired]
            if live or not rows:
                return live

    def next_due(self, queues=None):
        """The earliest due time of a queued step, or None."""
        sql = "select min(due) from litetq_jobs where status = 'queued'"
        if queues:
            sql += " and queue in (%s)" % ", ".join("?" * len(queues))
        return self.read_one(sql, tuple(queues or ()))[0]

    def renew_leases(self, claims, lease):
        with self.write() as conn:
            conn.executemany(
                "update litetq_jobs set lease_until = ? where id = ? and started = ? "
                "and status = 'running'",
                [(time.time() + lease, job_id, token) for job_id, token in claims])

    def step_succeeded(self, job_id, token, result=None, call=None, now=None):
        """Record a finished step: its `result` JSON, or the continuation `call`
        (name, args JSON, rest JSON). Returns the job's new status, or None if the
        claim was lost meanwhile (another worker owns the step now)."""
        now = now or time.time()
        if self._succeeded_alone(job_id, token, now, result, call):
            return "complete" if call is None else "queued"
        with self.write() as conn:
            held, _ = self._held(conn, job_id, token, now)
            if held != "running":
                return held
            if call is not None:
                conn.execute("update litetq_jobs set name = ?, args = ?, rest = ?, "
                             "steps = steps + 1, attempts = 0, lost = 0, error = null, "
                             "expires = null where id = ?", (*call, job_id))
            resume = "continue" if call is not None else "complete"
            conn.execute("update litetq_jobs set status = 'waiting', resume = ?, result = ?, "
                         "lease_until = null where id = ?", (resume, result, job_id))
            self._settle(conn, job_id, now)
            return conn.execute("select status from litetq_jobs where id = ?",
                                (job_id,)).fetchone()[0]

    def _succeeded_alone(self, job_id, token, now, result, call):
        """The common case in one statement: no cancel flag, no subtasks of this step,
        and (to complete) no parent to tell. False sends the caller the long way."""
        no_subtasks = ("cancel = 0 and not exists (select 1 from litetq_jobs c "
                       "where c.parent_id = :id and (c.status in "
                       "('queued', 'running', 'waiting') or c.created >= :token))")
        claimed = "id = :id and started = :token and status = 'running'"
        params = {"id": job_id, "token": token, "now": now, "result": result}
        if call is None:
            sql = ("update litetq_jobs set status = 'complete', result = :result, "
                   "finished = :now, error = null, traceback = null, lease_until = null "
                   f"where {claimed} and parent_id is null and {no_subtasks}")
        else:
            sql = ("update litetq_jobs set status = 'queued', name = :name, args = :args, "
                   "rest = :rest, steps = steps + 1, attempts = 0, lost = 0, error = null, "
                   "expires = null, due = :now, lease_until = null "
                   f"where {claimed} and {no_subtasks}")
            params.update(zip(("name", "args", "rest"), call))
        with self.lock:
            return self.conn.execute(sql, params).rowcount == 1

    def step_failed(self, job_id, token, error, tb, retry_at=None):
        """Record a failed attempt: queued again at `retry_at`, or failed for good.
        Returns the job's new status, or None if the claim was lost meanwhile."""
        now = time.time()
        with self.write() as conn:
            held, _ = self._held(conn, job_id, token, now, error, tb)
            if held != "running":
                return held
            if retry_at is None:
                self._end(conn, job_id, "failed", now, error=error, tb=tb)
                return "failed"
            conn.execute("update litetq_jobs set status = 'queued', due = ?, error = ?, "
                         "traceback = ?, lease_until = null, expires = null where id = ?",
                         (retry_at, error, tb, job_id))
            return "queued"

    def reap(self):
        """Queue again the steps whose worker stopped renewing its lease."""
        now = time.time()
        lapsed = self.read("select id, started from litetq_jobs where status = 'running' "
                           "and lease_until < ?", (now,))
        for job_id, token in lapsed:
            self.lose(job_id, token, "worker lost: its lease lapsed")
        return len(lapsed)

    def _held(self, conn, job_id, token, now, error=None, tb=None):
        """Before a step's end is recorded: ("running", lost count) while this claim
        still holds it; (None, None) if the claim was lost; ("cancelled", None) if the
        job was cancelled meanwhile, which ends it here."""
        row = conn.execute("select lost, cancel from litetq_jobs where id = ? and started = ? "
                           "and status = 'running'", (job_id, token)).fetchone()
        if row is None:
            return None, None
        if row[1]:
            self._end(conn, job_id, "cancelled", now, error=error, tb=tb)
            return "cancelled", None
        return "running", row[0]

    def lose(self, job_id, token, message):
        """A step whose worker died: queued again, not counted as an attempt (or
        cancelled, if that was asked); the MAX_LOST-th loss fails it as "worker lost"."""
        now = time.time()
        with self.write() as conn:
            held, lost = self._held(conn, job_id, token, now)
            if held != "running":
                return held
            if lost + 1 >= MAX_LOST:
                self._end(conn, job_id, "failed", now, error=f"worker lost: its worker died "
                          f"{MAX_LOST} times (the last time: {message})")
                return "failed"
            conn.execute("update litetq_jobs set status = 'queued', due = ?, error = ?, "
                         "attempts = attempts - 1, lost = lost + 1, lease_until = null "
                         "where id = ?", (now, message, job_id))
            return "queued"

    def _end(self, conn, job_id, status, now, error=None, tb=None, only_if=None):
        """Make a job terminal, then let its parent know."""
        sql = ("update litetq_jobs set status = ?, finished = ?, error = coalesce(?, error), "
               "traceback = coalesce(?, traceback), lease_until = null where id = ?")
        params = [status, now, error, tb, job_id]
        if only_if:
            sql += " and status = ?"
            params.append(only_if)
        row = conn.execute(sql + " returning parent_id", params).fetchone()
        if row is None:
            return
        if status != "complete":
            self._cancel_tree(conn, job_id, now, include_self=False)
        if row[0] is not None:
            self._settle(conn, row[0], now)

    def _settle(self, conn, job_id, now):
        """A waiting job whose subtasks are all terminal resumes, completes or fails."""
        row = conn.execute("select status, resume, result, started from litetq_jobs "
                           "where id = ?", (job_id,)).fetchone()
        if row is None or row[0] != "waiting":
            return
        if conn.execute("select 1 from litetq_jobs where parent_id = ? and status in "
                        "('queued', 'running', 'waiting') limit 1", (job_id,)).fetchone():
            return
        # Only subtasks spawned by the current step count: a retried parent starts afresh.
        bad = conn.execute("select id, name, status, error from litetq_jobs "
                           "where parent_id = ? and created >= ? and status != 'complete' "
                           "order by id limit 1", (job_id, row[3])).fetchone()
        if bad:
            child, name, status, error = bad
            detail = f": {error}" if status == "failed" else f" ({status})"
            self._end(conn, job_id, "failed", now,
                      error=f"subtask {child} ({name}) {status}{detail}")
        elif row[1] == "continue":
            conn.execute("update litetq_jobs set status = 'queued', due = ?, resume = null "
                         "where id = ?", (now, job_id))
        else:
            conn.execute("update litetq_jobs set error = null, traceback = null where id = ?",
                         (job_id,))
            self._end(conn, job_id, "complete", now)

    def _cancel_tree(self, conn, job_id, now, include_self=True):
        """Cancel a job (if asked) and its unfinished descendants; flag running ones."""
        ids = [row[0] for row in conn.execute(
            "with recursive tree(id) as (select ? union all select j.id from litetq_jobs j "
            "join tree on j.parent_id = tree.id) select id from tree", (job_id,))]
        if not include_self:
            ids = ids[1:]
        changed = False
        for each in ids:
            changed |= conn.execute(
                "update litetq_jobs set status = 'cancelled', finished = ? where id = ? "
                "and status in ('queued', 'waiting')", (now, each)).rowcount > 0
            changed |= conn.execute(
                "update litetq_jobs set cancel = 1 where id = ? and status = 'running' "
                "and cancel = 0", (each,)).rowcount > 0
        return changed

    def cancel(self, job_id):
        now = time.time()
        with self.write() as conn:
            changed = self._cancel_tree(conn, job_id, now)
            parent = conn.execute("select parent_id from litetq_jobs where id = ?",
                                  (job_id,)).fetchone()
            if changed and parent and parent[0] is not None:
                self._settle(conn, parent[0], now)
            return changed

    def retry(self, job_id):
        with self.write() as conn:
            key = conn.execute("select unique_key from litetq_jobs where id = ? and status in "
                               "('failed', 'cancelled', 'expired')", (job_id,)).fetchone()
            holder = key and key[0] is not None and conn.execute(
                "select id from litetq_jobs where unique_key = ? and status in "
                "('queued', 'running', 'waiting')", key).fetchone()
            if holder:
                raise Error(f"job {job_id} cannot run again while job {holder[0]} holds "
                            f"its unique key {key[0]!r}")
            return conn.execute(
                "update litetq_jobs set status = 'queued', due = ?, attempts = 0, lost = 0, "
                "cancel = 0, expires = null, error = null, traceback = null, finished = null, "
                "resume = null where id = ? and status in ('failed', 'cancelled', 'expired')",
                (time.time(), job_id)).rowcount > 0

    def requeue(self, job_id, token):
        """Give a step back without counting the attempt (a worker shutting down)."""
        with self.write() as conn:
            self._give_back(conn, "id = ? and started = ?", (job_id, token))

    def _give_back(self, conn, where, params):
        """Queue again, uncounted, the running steps matching `where`; those whose job
        was cancelled meanwhile end as cancelled instead of running again."""
        now = time.time()
        for (job_id,) in conn.execute(f"select id from litetq_jobs where {where} "
                                      "and status = 'running' and cancel = 1",
                                      params).fetchall():
            self._end(conn, job_id, "cancelled", now)
        return conn.execute(f"update litetq_jobs set status = 'queued', lease_until = null, "
                            f"attempts = attempts - 1 where {where} and status = 'running'",
                            params).rowcount

    def has_work(self, queues, workers):
        """True if a step is due in `queues` or claimed (begun or not) by one of the
        `workers`: one statement, so a step that finishes and queues its continuation
        between two reads cannot hide."""
        due = "status = 'queued' and due <= ?"
        if queues:
            due += f" and queue in ({', '.join('?' * len(queues))})"
        claimed = f"status = 'running' and worker in ({', '.join('?' * len(workers))})"
        return bool(self.read_one(
            f"select exists (select 1 from litetq_jobs where {due}) "
            f"or exists (select 1 from litetq_jobs where {claimed})",
            (time.time(), *(queues or ()), *workers))[0])

    def release(self, worker):
        """Give back, uncounted, the steps a stopped worker process still held."""
        with self.write() as conn:
            return self._give_back(conn, "worker = ?", (worker,))

    # Reading jobs.

    def job(self, job_id):
        row = self.read_one(f"select {JOB_COLUMNS} from litetq_jobs where id = ?", (job_id,))
        if row is None:
            raise NotFound(f"no job {job_id} in {self.path}")
        return dict(zip(JOB_COLUMNS.split(", "), row))

    def job_field(self, job_id, column):
        row = self.read_one(f"select {column} from litetq_jobs where id = ?", (job_id,))
        if row is None:
            raise NotFound(f"no job {job_id} in {self.path}")
        return row[0]

    def jobs(self, status=None, queue=None, name=None, limit=100, parent=None):
        clauses, params = [], []
        for column, value in (("status", status), ("queue", queue), ("name", name),
                              ("parent_id", parent)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"where {' and '.join(clauses)}" if clauses else ""
        order = "order by id" if parent is not None else "order by id desc"
        return [row[0] for row in self.read(
            f"select id from litetq_jobs {where} {order} limit ?", (*params, limit))]

    def stats(self):
        counts = {}
        for queue, status, n in self.read(
                "select queue, status, count(*) from litetq_jobs group by queue, status"):
            counts.setdefault(queue, {})[status] = n
        return counts

    def oldest_wait(self):
        """Seconds the longest-waiting due job has waited, or None."""
        row = self.read_one("select min(due) from litetq_jobs where status = 'queued' "
                            "and due <= ?", (time.time(),))
        return None if row[0] is None else time.time() - row[0]

    def purge(self, statuses, before):
        with self.write() as conn:
            marks = ", ".join("?" * len(statuses))
            ids = f"select id from litetq_jobs where status in ({marks}) and finished < ?"
            conn.execute(f"delete from litetq_logs where job_id in ({ids})", (*statuses, before))
            return conn.execute(f"delete from litetq_jobs where id in ({ids})",
                                (*statuses, before)).rowcount

    # Inside a step: logs, progress, cancellation.

    def add_log(self, job_id, level, message):
        with self.write() as conn:
            conn.execute("insert into litetq_logs (job_id, time, level, message) "
                         "values (?, ?, ?, ?)", (job_id, time.time(), level, message))

    def logs(self, job_id):
        """Logs of a job and all its subtasks, oldest first."""
        return self.read(
            "with recursive tree(id) as (select ? union all select j.id from litetq_jobs j "
            "join tree on j.parent_id = tree.id) select time, level, message, job_id "
            "from litetq_logs where job_id in (select id from tree) order by time, id",
            (job_id,))

    def set_progress(self, job_id, progress):
        with self.write() as conn:
            conn.execute("update litetq_jobs set progress = ? where id = ?", (progress, job_id))

    # Raw payload queues.

    def put(self, queue, payload):
        with self.lock:
            return self.conn.execute(
                "insert into litetq_messages (queue, payload, visible) values (?, ?, ?)",
                (queue, payload, time.time())).lastrowid

    def get(self, queues, visibility):
        now = time.time()
        marks = ", ".join("?" * len(queues))
        with self.write() as conn:
            return conn.execute(
                "update litetq_messages set visible = ?, deliveries = deliveries + 1 "
                "where id = (select id from litetq_messages where queue in "
                f"({marks}) and visible <= ? order by visible, id limit 1) "
                "returning id, queue, payload, deliveries",
                (now + visibility, *queues, now)).fetchone()

    def messages_due(self, queues):
        marks = ", ".join("?" * len(queues))
        return self.read_one(f"select 1 from litetq_messages where queue in ({marks}) "
                             "and visible <= ? limit 1", (*queues, time.time())) is not None

    def ack(self, message_id):
        with self.lock:
            self.conn.execute("delete from litetq_messages where id = ?", (message_id,))

    def nack(self, message_id, delay):
        with self.lock:
            self.conn.execute("update litetq_messages set visible = ? where id = ?",
                              (time.time() + delay, message_id))

    # The cron table.

    def save_schedule(self, name, spec, call, tz, queue, next_run):
        """Add or change an entry; its next run is kept when spec and zone are unchanged."""
        with self.write() as conn:
            conn.execute(
                "insert into litetq_cron (name, spec, task, tz, queue, next_run) "
                "values (?, ?, ?, ?, ?, ?) on conflict (name) do update set "
                "next_run = case when spec = excluded.spec and tz is excluded.tz "
                "then next_run else excluded.next_run end, spec = excluded.spec, "
                "task = excluded.task, tz = excluded.tz, queue = excluded.queue",
                (name, spec, call, tz, queue, next_run))

    def delete_schedule(self, name):
        with self.write() as conn:
            conn.execute("delete from litetq_cron_fired where name = ?", (name,))
            return conn.execute("delete from litetq_cron where name = ?", (name,)).rowcount > 0

    def schedules(self):
        return self.read("select name, spec, task, tz, queue, next_run, last_run "
                         "from litetq_cron order by name")

    @contextlib.contextmanager
    def due_schedules(self, now):
        """Inside one write transaction: the entries due at `now`, and a function
        `fire(name, fire_time, job_row, next_run, last_run)` that enqueues the job of one fire
        time unless it already has one (the primary key of litetq_cron_fired guards
        this), and moves the entry on. `fire` returns the new job's id, or None."""
        with self.write() as conn:
            rows = conn.execute("select name, spec, task, tz, queue, next_run "
                                "from litetq_cron where next_run <= ?", (now,)).fetchall()

            def fire(name, fire_time, job_row, next_run, last_run):
                conn.execute("update litetq_cron set next_run = ?, last_run = ? "
                             "where name = ?", (next_run, last_run, name))
                if conn.execute("select 1 from litetq_cron_fired where name = ? "
                                "and fire_time = ?", (name, fire_time)).fetchone():
                    return None
                job_id = conn.execute(_insert_sql(job_row), job_row).lastrowid
                conn.execute("insert into litetq_cron_fired values (?, ?, ?)",
                             (name, fire_time, job_id))
                # The records only guard against a fire time being taken twice at once.
                conn.execute("delete from litetq_cron_fired where name = ? and fire_time < ?",
                             (name, fire_time - 86400))
                return job_id
            yield rows, fire

    # Workers.

    def register_worker(self, worker_id, queues, concurrency):
        now = time.time()
        with self.write() as conn:
            conn.execute("insert or replace into litetq_workers values (?, ?, ?, ?, ?, ?, ?)",
                         (worker_id, socket.gethostname(), os.getpid(), queues, concurrency,
                          now, now))

    def heartbeat(self, worker_id):
        with self.write() as conn:
            conn.execute("update litetq_workers set heartbeat = ? where id = ?",
                         (time.time(), worker_id))

    def unregister_worker(self, worker_id):
        with self.write() as conn:
            conn.execute("delete from litetq_workers where id = ?", (worker_id,))

    def workers(self):
        return self.read("select id, host, pid, queues, concurrency, started, heartbeat "
                         "from litetq_workers order by started")


# --- The queue API -----------------------------------------------------------

class Queue:
    """A durable job queue in one SQLite database (a file, or ":memory:" for tests).

    `synchronous="FULL"` makes each commit survive power loss; the default "NORMAL"
    survives application crashes. `lease` is how long a claimed step is ours without
    renewal: a worker that dies is noticed this many seconds later.
    """

    def __init__(self, path, synchronous="NORMAL", *, lease=DEFAULT_LEASE):
        self.path, self.lease = os.fspath(path), float(lease)
        self.storage = Storage(self.path, synchronous)
        self._changed = threading.Condition()  # wakes waiters in this process at once
        self._claims = {}  # job id -> claim token of steps claimed by this process
        self._finished = []  # deferred successes, see _save_finished()
        self._durations = {}  # task name -> typical seconds per step (workers batch quick ones)
        self._keeper = None  # (pid, thread) renewing those claims' leases
        self._closed = threading.Event()
        self._waiters = 0  # threads in _wait_until: nobody to notify saves a lock per step
        self._worker_id = (None, None)

    def __repr__(self):
        return f"<litetq.Queue {self.path!r}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self._closed.set()
        self.storage.close()

    @property
    def worker_id(self):
        """host:pid of this process, as stored on the jobs it claims."""
        if self._worker_id[0] != os.getpid():
            self._worker_id = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}")
        return self._worker_id[1]

    # Enqueueing.

    def enqueue(self, task, *, queue=None, priority=None, delay=None, at=None, ttl=None,
                unique=None, conn=None):
        """Durably add a call; returns its `Job`. With `conn`, the job is written in the
        caller's open transaction on the same file and appears only if it commits."""
        row = self._job_row(task, queue, priority, delay, at, ttl, unique)
        return Job(self, self.storage.insert_jobs([row], conn)[0])

    def enqueue_many(self, tasks, *, queue=None, priority=None, delay=None, at=None, ttl=None,
                     unique=None, conn=None):
        """Add many calls in one transaction; returns their `Job`s in order."""
        now = time.time()
        rows = [self._job_row(t, queue, priority, delay, at, ttl, unique, now=now)
                for t in tasks]
        if not rows:
            return []
        return [Job(self, job_id) for job_id in self.storage.insert_jobs(rows, conn)]

    def _job_row(self, task, queue, priority, delay, at, ttl, unique, parent=None, now=None):
        """The INSERT_JOB parameters for `task`; options default to the task's own."""
        if not isinstance(task, Task):
            raise TypeError(f"enqueue() takes a Task such as hello('world'), "
                            f"not {type(task).__name__} {_short_repr(task)}")
        call, rest = _flatten(task, []) if task.name == CHAIN else (task, None)
        if call is None:
            raise ValueError("an empty chain has nothing to run")
        function = _registry.get(call.name)  # producers need not import every task
        if queue is None:
            queue = function.queue if function else "default"
        if priority is None:
            priority = function.priority if function else 0
        if ttl is None and function:
            ttl = function.ttl
        now = now or time.time()
        due = now if delay is None and at is None else _due_time(now, delay, at)
        row = (queue, int(priority), call.name, _dumps_call(call), due, now)
        if rest or ttl is not None or unique is not None or parent is not None:
            row += (_dumps(rest, "chain") if rest else None,
                    None if ttl is None else due + ttl, unique, parent)
        return row

    # Reading jobs.

    def job(self, job_id):
        """The `Job` with this id; `NotFound` if there is none."""
        self.storage.job_field(int(job_id), "id")
        return Job(self, int(job_id))

    def jobs(self, status=None, queue=None, task=None, limit=100):
        """Jobs, newest first, filtered by status, queue name and task name."""
        if isinstance(task, (Task, TaskFunction)):
            task = task.name
        return [Job(self, i) for i in self.storage.jobs(status, queue, task, limit)]

    def stats(self):
        """{queue name: {status: count}}."""
        return self.storage.stats()

    # Running work in this process.

    def run_until_idle(self, max_steps=None):
        """Run due steps here, one at a time in queue order, until nothing is due."""
        self.storage.reap()
        steps = 0
        while (max_steps is None or steps < max_steps) and self._work_once():
            steps += 1
        return steps

    def _work_once(self, queues=None):
        """Run one due step or consumer message; False if there was none."""
        claims = self.storage.claim(self.worker_id, self.lease, queues)
        if claims:
            self._run_step(claims[0])
            return True
        return self._consume_one(queues)

    def _run_step(self, claim, defer=False):
        """Run one claimed step and commit its outcome; returns the job's new status.
        With `defer`, a success is only noted, for _save_finished() to commit later."""
        job_id = claim.id
        self._claims[job_id] = claim.started
        self._keep_leases()
        try:
            return self._execute(claim, defer)
        finally:
            if not defer:
                self._claims.pop(job_id, None)
                self._notify()

    def _save_finished(self):
        """Commit the deferred successes together: one transaction for a batch of steps."""
        finished, self._finished = self._finished, []
        if not finished:
            return
        try:
            with self.storage.write():
                for job_id, token, result, call, now in finished:
                    if self.storage.step_succeeded(job_id, token, result, call, now) is None:
                        logger.warning("job %s lost its claim before its result was saved",
                                       job_id)
        except Error:
            self._finished = finished + self._finished  # locked: keep them for next time
            raise
        for job_id, token, *_ in finished:
            self._claims.pop(job_id, None)
        self._notify()

    def _execute(self, claim, defer=False):
        job_id, name, attempt, token = claim.id, claim.name, claim.attempts, claim.started
        try:
            function = _lookup_task(name)
        except Error as exc:
            return self.storage.step_failed(job_id, token, str(exc), None)
        context = Context(self, Job(self, job_id), attempt, function.atomic)
        reset = _current.set(context)
        try:
            params, kwargs = loads(claim.args)
            result, call = _outcome(function.func(*params, **kwargs),
                                    claim.rest and loads(claim.rest))
            if defer and context._db is None:
                self._finished.append((job_id, token, result, call, time.time()))
                return "complete" if call is None else "queued"
            status = self.storage.step_succeeded(job_id, token, result, call)
            if status is None:
                raise Error(f"job {job_id} lost its claim while running (lease expired)")
        except Exception as exc:
            context._end_transaction(commit=False)
            return self._fail_attempt(function, job_id, token, attempt, exc)
        else:
            context._end_transaction(commit=True)
            return status
        finally:
            _current.reset(reset)

    def _fail_attempt(self, function, job_id, token, attempt, exc, error=None, tb=None):
        """Queue the step again if retries are left, else fail the job."""
        retry_at = None
        if function and not isinstance(exc, Fatal) and attempt <= function.retries:
            delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else min(
                function.retry_delay * 2 ** (attempt - 1), MAX_RETRY_DELAY)
            retry_at = time.time() + delay
        if error is None:
            error = str(exc) if isinstance(exc, Fatal) else f"{type(exc).__name__}: {exc}"
        return self.storage.step_failed(job_id, token, error,
                                        traceback.format_exc() if tb is None else tb, retry_at)

    def _fail_claim(self, job_id, token, message):
        """Fail the attempt of a step whose process was killed (retries apply)."""
        row = self.storage.job(job_id)
        function = None
        with contextlib.suppress(Error):
            function = _lookup_task(row["name"])
        return self._fail_attempt(function, job_id, token, row["attempts"], Error(message),
                                  error=message, tb="")

    def _keep_leases(self):
        """Start, once per process, the thread that renews our running steps' leases."""
        if self._keeper is None or self._keeper[0] != os.getpid():
            thread = threading.Thread(target=self._renew_leases, daemon=True,
                                      name="litetq-leases")
            self._keeper = (os.getpid(), thread)
            thread.start()

    def _renew_leases(self):
        while not self._closed.wait(self.lease / 3):
            claims = list(self._claims.items())
            if claims:
                try:
                    self.storage.renew_leases(claims, self.lease)
                except (Error, sqlite3.Error):
                    logger.exception("could not renew leases")

    # Waiting.

    def _notify(self):
        if self._waiters:
            with self._changed:
                self._changed.notify_all()

    def _wait_until(self, predicate, timeout=None):
        """Wait for predicate() without a busy loop: woken at once by this process's
        commits, and within WAIT_POLL of another process's (PRAGMA data_version)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        version = None
        while True:
            latest = self.storage.data_version()
            if latest != version or self.storage.memory:  # one shared connection: no news
                if predicate():
                    return True
                version = latest
            remaining = WAIT_POLL if deadline is None else min(
                WAIT_POLL, deadline - time.monotonic())
            if remaining <= 0:
                return predicate()
            with self._changed:
                self._waiters += 1
                try:
                    if self._changed.wait(remaining):
                        version = None
                finally:
                    self._waiters -= 1

    # Raw payload queues.

    def put(self, queue_name, payload):
        """Add a JSON payload to a raw queue; returns the message id."""
        message_id = self.storage.put(queue_name, _dumps(payload, "payload"))
        self._notify()
        return message_id

    def get(self, queue_name, timeout=0, visibility=30):
        """The next message of a raw queue, or None after `timeout` seconds. A message
        not acked within `visibility` seconds is delivered again."""
        found = []

        def take():
            row = self.storage.get([queue_name], visibility)
            if row:
                found.append(Message(self, row[0], row[1], loads(row[2]), row[3]))
            return bool(row)
        self._wait_until(take, timeout)
        return found[0] if found else None

    def _consume_one(self, queues=None):
        """Hand one message to its registered consumer; False if none was waiting."""
        names = [name for name in _consumers if not queues or name in queues]
        row = self.storage.get(names, max(30.0, self.lease * 3)) if names else None
        if row is None:
            return False
        message = Message(self, row[0], row[1], loads(row[2]), row[3])
        try:
            _consumers[message.queue](message.payload)
        except Exception:
            logger.exception("consumer of %r failed on message %s", message.queue, message.id)
            message.nack(delay=min(2.0 ** message.deliveries, MAX_RETRY_DELAY))
        else:
            message.ack()
        return True

    # The cron table.

    def schedule(self, name, spec, task, tz=None, queue=None):
        """Add (or change) a cron entry that enqueues `task` at each time `spec` names."""
        cron = Cron(spec, tz)
        self._job_row(task, queue, None, None, None, None, None)  # bad tasks fail here
        next_run = cron.next(datetime.datetime.now(datetime.timezone.utc)).timestamp()
        self.storage.save_schedule(name, spec, dumps(task), tz, queue, next_run)

    def unschedule(self, name):
        """Remove a cron entry; False if there was none."""
        return self.storage.delete_schedule(name)

    def schedules(self):
        """The cron table: dicts of name, spec, task, tz, queue, next_run, last_run."""
        keys = ("name", "spec", "task", "tz", "queue", "next_run", "last_run")
        entries = [dict(zip(keys, row)) for row in self.storage.schedules()]
        for entry in entries:
            entry["task"] = loads(entry["task"])
        return entries

    def fire_due(self, now=None):
        """Enqueue each cron entry due at `now`, exactly once per fire time, however many
        processes call this at once. Missed fire times collapse into one job."""
        if now is None:
            now = time.time()
        elif isinstance(now, datetime.datetime):
            now = now.timestamp()  # a naive datetime is local time, as for enqueue(at=)
        jobs = []
        after = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        with self.storage.due_schedules(now) as (rows, fire):
            for name, spec, call, tz, queue, next_run in rows:
                cron = Cron(spec, tz)
                following = cron.next(after).timestamp()
                missed = cron.next(datetime.datetime.fromtimestamp(
                    next_run, datetime.timezone.utc)).timestamp() <= now
                row = self._job_row(loads(call), queue, None, None, None, None, None)
                # One job stands for every missed fire time: it ran now.
                job_id = fire(name, next_run, row, following, now if missed else next_run)
                if job_id is not None:
                    jobs.append(Job(self, job_id))
        return jobs


def _due_time(now, delay, at):
    if delay is not None and at is not None:
        raise TypeError("give delay= or at=, not both")
    if delay is not None:
        return now + float(delay)
    if isinstance(at, datetime.datetime):
        return at.timestamp()  # a naive datetime is local time, as datetime.timestamp() says
    if at is not None:
        return float(at)
    return now


def _dumps_call(call):
    """The stored form of a call's arguments; errors name `args[1]['when']` style paths."""
    if not call.args and not call.kwargs:
        return "[[],{}]"
    return "[%s,%s]" % (_dumps(call.args, "args"), _dumps(call.kwargs, "kwargs"))


def _outcome(value, rest):
    """What a step's return value means: (result JSON, None) when the job is done, or
    (None, (name, args JSON, rest JSON)) for the continuation to run next."""
    call, rest, value = _advance(value, rest or [])
    if call is None:
        try:
            return _dumps(value, "result"), None
        except TypeError as exc:
            raise Fatal(str(exc)) from None
    return None, (call.name, _dumps_call(call), _dumps(rest, "chain") if rest else None)


_default = None
_env_queues = {}
_default_lock = threading.Lock()


def use(queue):
    """Make `queue` (a Queue or a database path) the default for `.delay()`."""
    global _default
    _default = queue if isinstance(queue, Queue) else Queue(queue)
    return _default


def _default_queue():
    if _default is not None:
        return _default
    path = os.environ.get("LITETQ_DB")
    if not path:
        raise RuntimeError("no queue database: call litetq.use('app.sqlite') "
                           "or set the LITETQ_DB environment variable")
    with _default_lock:
        if path not in _env_queues:
            _env_queues[path] = Queue(path)
        return _env_queues[path]


class Job:
    """A handle on one job; every attribute is read fresh from the database."""

    __slots__ = ("queue", "id")

    def __init__(self, queue, job_id):
        self.queue, self.id = queue, job_id

    def __repr__(self):
        return f"<Job {self.id}>"

    def __eq__(self, other):
        return isinstance(other, Job) and (self.id, self.queue.path) == (
            other.id, other.queue.path)

    def __hash__(self):
        return hash(self.id)

    def _field(self, column):
        return self.queue.storage.job_field(self.id, column)

    @property
    def status(self):
        return self._field("status")

    @property
    def task(self):
        return _call_of(self.queue.storage.job(self.id))

    @property
    def attempts(self):
        return self._field("attempts")

    @property
    def steps(self):
        return self._field("steps")

    @property
    def error(self):
        return self._field("error")

    @property
    def progress(self):
        value = self._field("progress")
        return None if value is None else tuple(json.loads(value))

    @property
    def parent(self):
        parent_id = self._field("parent_id")
        return None if parent_id is None else Job(self.queue, parent_id)

    def children(self):
        """The subtasks this job spawned, oldest first."""
        return [Job(self.queue, i) for i in self.queue.storage.jobs(parent=self.id, limit=-1)]

    def logs(self):
        """This job's log lines and its subtasks', oldest first."""
        keys = ("time", "level", "message", "job_id")
        return [dict(zip(keys, row)) for row in self.queue.storage.logs(self.id)]

    def done(self):
        return self.status in TERMINAL

    def wait(self, timeout=None):
        """Block until the job is terminal; returns the job."""
        if not self.queue._wait_until(self.done, timeout):
            raise TimeoutError(f"job {self.id} is still {self.status} after {timeout} s")
        return self

    def result(self, timeout=None):
        """Block until terminal and return the final value, or raise what happened."""
        row = self.wait(timeout).queue.storage.job(self.id)
        status = row["status"]
        if status == "complete":
            return loads(row["result"]) if row["result"] is not None else None
        if status == "failed":
            raise TaskFailed(self.id, row["error"], row["traceback"])
        if status == "cancelled":
            raise Cancelled(f"job {self.id} was cancelled")
        raise Expired(f"job {self.id} expired before it ran")

    def cancel(self):
        """Cancel a queued or waiting job; flag a running one. True if anything changed."""
        changed = self.queue.storage.cancel(self.id)
        self.queue._notify()
        return changed

    def retry(self):
        """Queue a failed, cancelled or expired job again; True if it was one."""
        changed = self.queue.storage.retry(self.id)
        self.queue._notify()
        return changed

    def to_dict(self):
        """Everything about the job as JSON-ready data (for the CLI and web page)."""
        row = self.queue.storage.job(self.id)
        call = _call_of(row)
        info = {key: row[key] for key in (
            "id", "queue", "priority", "status", "name", "attempts", "steps", "error",
            "traceback", "created", "started", "finished", "due")}
        info.update(task=repr(call), args=_encode(list(call.args)), kwargs=_encode(call.kwargs),
                    parent_id=row["parent_id"],
                    progress=json.loads(row["progress"]) if row["progress"] else None,
                    result=json.loads(row["result"]) if row["result"] else None)
        return info


def _call_of(row):
    """The Task a job row runs now."""
    args, kwargs = loads(row["args"])
    return Task(row["name"], args, kwargs)


class Message:
    """One delivery of a raw payload; `with q.get(...) as msg` acks or nacks it."""

    def __init__(self, queue, message_id, queue_name, payload, deliveries):
        self._queue, self.id, self.queue = queue, message_id, queue_name
        self.payload, self.deliveries = payload, deliveries

    def __repr__(self):
        return f"<Message {self.id} on {self.queue!r}>"

    def ack(self):
        """Done with it: the message is deleted."""
        self._queue.storage.ack(self.id)

    def nack(self, delay=0):
        """Not done: deliver it again after `delay` seconds."""
        self._queue.storage.nack(self.id, delay)
        self._queue._notify()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.ack() if exc_type is None else self.nack()


# --- Inside a task -----------------------------------------------------------

_current = contextvars.ContextVar("litetq_current")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


def current():
    """The running step's `Context`; RuntimeError outside a task."""
    context = _current.get(None)
    if context is None:
        raise RuntimeError("litetq.current() is only available inside a running task")
    return context


class Context:
    """What a running step knows about itself. Without a queue (Task.run()), logs go to
    `logging`, progress stays in memory, and spawn and db are unavailable."""

    def __init__(self, queue=None, job=None, attempt=1, atomic=False):
        self.job, self.attempt = job, attempt
        self.last_progress = None
        self._queue, self._atomic, self._db = queue, atomic, None

    def log(self, message, level="info"):
        """Store a log line on the job (and its parents' view) and send it to logging."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
        prefix = f"job {self.job.id}: " if self.job else ""
        logger.log(LEVELS[level], "%s%s", prefix, message)
        if self._queue:
            self._queue.storage.add_log(self.job.id, level, str(message))

    def progress(self, done, total=None):
        """Report progress, readable as `job.progress`."""
        self.last_progress = (done, total)
        if self._queue:
            self._queue.storage.set_progress(self.job.id, json.dumps([done, total]))

    def spawn(self, task, **options):
        """Enqueue a subtask: this job waits for it before it completes."""
        queue = self._need_queue("spawn")
        known = {"queue", "priority", "delay", "at", "ttl", "unique"}
        if set(options) - known:
            raise TypeError(f"spawn() got unknown options: {', '.join(set(options) - known)}")
        row = queue._job_row(task, **{k: options.get(k) for k in known}, parent=self.job.id)
        conn = self.db if self._atomic else None  # atomic: spawned iff the step commits
        return Job(queue, queue.storage.insert_jobs([row], conn)[0])

    @property
    def cancelled(self):
        """True once job.cancel() was called on this job."""
        return bool(self._queue and self._queue.storage.job_field(self.job.id, "cancel"))

    @property
    def db(self):
        """For @task(atomic=True): a connection inside this step's transaction."""
        queue = self._need_queue("ctx.db")
        if not self._atomic:
            raise RuntimeError("ctx.db is only for tasks declared with @task(atomic=True)")
        if self._db is None:
            self._db = queue.storage.begin_step()
        return self._db

    def _need_queue(self, what):
        if self._queue is None:
            raise RuntimeError(f"{what} needs a queue: it works in a job run by a worker "
                               f"or run_until_idle(), not under Task.run()")
        return self._queue

    def _end_transaction(self, commit):
        if self._db is not None:
            self._db, db = None, self._db
            self._queue.storage.end_step(db, commit)


# --- Cron ----------------------------------------------------------------------
#
# Cron expressions in the Vixie/Debian dialect, evaluated without the database.
# The search jumps field by field over wall-clock times (month, then day, then
# the time of day), so even "0 0 29 2 *" is found in a few hundred steps; time
# zones only come in at the end, to turn a wall-clock time into an instant.
#
# Daylight saving follows Debian cron (as the cronsim library does), and the
# contract's rule for repeated hours:
#   * An entry with fixed minute and hour fields (no leading "*" in either) is
#     a job "at a particular time". If that time is skipped by a spring-forward
#     gap it fires once, at the first instant after the gap.
#   * An entry with "*" leading the minute or hour field (including @hourly)
#     has no times inside a gap.
#   * In a repeated (fall-back) hour every entry fires each wall-clock time
#     once, on the first pass. (cronsim runs "*" entries on both passes.)

_CRON_FIELDS = (  # name, lowest, highest; the order of a 6-field spec
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)
_CRON_NAMES = {
    "month": {name: number for number, name in enumerate(
        "jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)},
    "day-of-week": {name: number for number, name in enumerate(
        "sun mon tue wed thu fri sat".split())},
}
_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_CRON_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # leap Feb


class Cron:
    """A cron expression in a time zone: ``Cron("*/5 * * * *", tz="Europe/Berlin")``.

    Five fields (minute hour day-of-month month day-of-week) or six with
    seconds first; ``*``, ``a``, ``a-b``, ``*/n``, ``a-b/n``, ``a/n`` (a to the
    end, every n) and lists ``a,b``; month names jan-dec and weekday names
    sun-sat; 0 and 7 are Sunday; the @yearly, @annually, @monthly, @weekly,
    @daily, @midnight and @hourly aliases. When both day fields are restricted
    a day matching either one is enough; a field that starts with "*" (such as
    "*/2") counts as unrestricted. ``tz`` is a zoneinfo name (default UTC).
    A bad spec or zone raises ValueError.
    """

    def __init__(self, spec, tz=None):
        if not isinstance(spec, str):
            raise TypeError(f"cron spec must be a string, got {spec!r}")
        self.spec = spec
        self.tz = tz
        self._zone = _cron_zone(tz)
        fields, self._has_seconds = _cron_split(spec)
        parsed = [_cron_field(spec, text, *field) for text, field in zip(fields, _CRON_FIELDS)]
        self._seconds, self._minutes, self._hours = (sorted(values) for values in parsed[:3])
        self._doms, self._months = parsed[3], parsed[4]
        self._dows = {dow % 7 for dow in parsed[5]}  # 7 is Sunday too
        # Vixie cron ORs the day fields only when neither starts with "*".
        self._day_or = not (fields[3].startswith("*") or fields[5].startswith("*"))
        # Debian cron's DST rules treat "a particular time" specially.
        self._fixed_clock = not (fields[1].startswith("*") or fields[2].startswith("*"))
        self._check_days_exist(fields[3])

    def __repr__(self):
        if self.tz is None:
            return f"Cron({self.spec!r})"
        return f"Cron({self.spec!r}, tz={self.tz!r})"

    def __eq__(self, other):
        if not isinstance(other, Cron):
            return NotImplemented
        return (self.spec, self.tz) == (other.spec, other.tz)

    def __hash__(self):
        return hash((self.spec, self.tz))

    def next(self, after):
        """Return the first fire time strictly later than `after`.

        `after` is a datetime: a naive one is read in this Cron's zone, an
        aware one is converted. The result is aware, in this Cron's zone.
        """
        try:
            start = self._localize(after)
            if self._fixed_clock:
                return self._next_fixed(start)
            return self._next_following_clock(start)
        except OverflowError:
            raise ValueError(
                f"cron spec {self.spec!r} has no fire time after {after} "
                "that a datetime can hold") from None

    def matches(self, moment):
        """Return True if this entry fires at `moment` (naive: in this Cron's zone).

        `moment` is taken to the minute for a 5-field spec and to the second
        for a 6-field one, so 12:00:30 matches "0 12 * * *".
        """
        # replace() keeps the fold, so a repeated hour's second pass is
        # still told apart from its first.
        local = self._localize(moment).replace(microsecond=0)
        if not self._has_seconds:
            local = local.replace(second=0)
        instant = local.astimezone(datetime.timezone.utc)
        fires = self.next(instant - datetime.timedelta(microseconds=1))
        # Compare in UTC: == across zones is always False for an ambiguous time.
        return fires.astimezone(datetime.timezone.utc) == instant

    # The search, in wall-clock (naive) time.

    def _check_days_exist(self, dom_text):
        """Reject a spec whose day-of-month never falls in its months."""
        longest = max(_CRON_MONTH_DAYS[month] for month in self._months)
        if not self._day_or and min(self._doms) > longest:
            raise ValueError(
                f"bad day-of-month field {dom_text!r} in cron spec {self.spec!r}: "
                f"none of the chosen months has a day {min(self._doms)}, "
                "so it would never fire")

    def _next_wall(self, start):
        """Return the first matching wall-clock time at or after naive `start`."""
        day = self._next_day(start.date())
        clock = (start.hour, start.minute, start.second) if day == start.date() else (0, 0, 0)
        found = self._next_clock(*clock)
        while found is None:  # nothing left today: the first time of the next day
            day = self._next_day(day + datetime.timedelta(days=1))
            found = self._next_clock(0, 0, 0)
        return datetime.datetime(day.year, day.month, day.day, *found)

    def _next_clock(self, hour, minute, second):
        """Return the first matching (h, m, s) at or after the given one, or None."""
        for h in self._hours[bisect.bisect_left(self._hours, hour):]:
            m_from = minute if h == hour else 0
            for m in self._minutes[bisect.bisect_left(self._minutes, m_from):]:
                s_from = second if (h, m) == (hour, minute) else 0
                i = bisect.bisect_left(self._seconds, s_from)
                if i < len(self._seconds):
                    return h, m, self._seconds[i]
        return None

    def _next_day(self, day):
        """Return the first allowed date on or after `day`."""
        year, month, first = day.year, day.month, day.day
        # The Gregorian calendar repeats every 400 years, so a spec that
        # passed _check_days_exist always matches within that.
        for _ in range(400 * 12 + 1):
            if year > 9999:
                raise OverflowError("past the last date a datetime can hold")
            if month in self._months:
                found = self._day_in_month(year, month, first)
                if found is not None:
                    return datetime.date(year, month, found)
            year, month, first = year + month // 12, month % 12 + 1, 1
        raise AssertionError(f"unreachable: no day matches cron spec {self.spec!r}")

    def _day_in_month(self, year, month, first):
        """Return the first allowed day of the month from day `first`, or None."""
        weekday, last = calendar.monthrange(year, month)  # Monday is 0 here
        for day in range(first, last + 1):
            dom_ok = day in self._doms
            dow_ok = (weekday + day) % 7 in self._dows  # cron's Sunday is 0
            if (dom_ok or dow_ok) if self._day_or else (dom_ok and dow_ok):
                return day
        return None

    # From wall-clock times to instants, with Debian cron's DST rules.

    def _localize(self, moment):
        """Return `moment` as a real (not skipped) aware time in this Cron's zone."""
        if not isinstance(moment, datetime.datetime):
            raise TypeError(f"expected a datetime, got {moment!r}")
        if moment.utcoffset() is None:
            moment = moment.replace(tzinfo=self._zone)
        return moment.astimezone(datetime.timezone.utc).astimezone(self._zone)

    def _next_fixed(self, after):
        """Next fire time of an entry at a particular time of day."""
        wall = after.replace(tzinfo=None)
        if after.fold:
            # The second pass of a repeated hour: the first pass already ran
            # these clock times, so go on from the end of the repetition.
            start = _cron_fold_end(self._zone, wall)
        else:
            start = wall.replace(microsecond=0) + datetime.timedelta(seconds=1)
        found = self._next_wall(start)
        if _cron_clock_kind(self._zone, found) == "skipped":
            return _cron_transition(self._zone, found).astimezone(self._zone)
        return found.replace(tzinfo=self._zone)  # fold=0: the first pass

    def _next_following_clock(self, after):
        """Next fire time of an entry with "*" in the minute or hour field: no times
        inside a gap, and in a repeated hour each clock time once, on its first pass."""
        wall = after.replace(tzinfo=None)
        if after.fold:  # the second pass: its clock times already fired on the first
            start = _cron_fold_end(self._zone, wall)
        else:
            start = wall.replace(microsecond=0) + datetime.timedelta(seconds=1)
        return self._next_real(start)

    def _next_real(self, start):
        """Return the first matching wall time at or after `start` that exists."""
        found = self._next_wall(start)
        while _cron_clock_kind(self._zone, found) == "skipped":
            resume = _cron_transition(self._zone, found).astimezone(self._zone)
            found = self._next_wall(resume.replace(tzinfo=None))
        return found.replace(tzinfo=self._zone)  # fold=0: a repeated time's first pass


def _cron_zone(tz):
    """Return the tzinfo for a Cron's `tz` argument (None means UTC)."""
    if tz is None:
        return datetime.timezone.utc
    if not isinstance(tz, str):
        raise TypeError(f"tz must be a zoneinfo name such as 'Europe/Berlin', got {tz!r}")
    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {tz!r}: use a zoneinfo name such as 'Europe/Berlin' "
            "(on Windows, pip install tzdata)") from None


def _cron_split(spec):
    """Return the six field texts of `spec` (seconds first) and
    whether the spec gave the seconds itself."""
    text = spec.strip()
    if text.startswith("@"):
        if text.lower() not in _CRON_ALIASES:
            raise ValueError(
                f"unknown alias {text!r} in cron spec {spec!r}: use one of "
                + ", ".join(_CRON_ALIASES))
        text = _CRON_ALIASES[text.lower()]
    fields = text.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"cron spec {spec!r} has {len(fields)} fields; it needs 5 (minute hour "
            "day-of-month month day-of-week) or 6 (with seconds first)")
    if len(fields) == 6:
        return fields, True
    return ["0", *fields], False


def _cron_field(spec, text, name, low, high):
    """Return the set of numbers a field's text allows."""
    allowed = set()
    for item in text.split(","):
        try:
            allowed.update(_cron_item(item, name, low, high))
        except ValueError as exc:
            raise ValueError(f"bad {name} field {text!r} in cron spec {spec!r}: {exc}") from None
    return allowed


def _cron_item(item, name, low, high):
    """Return the numbers one list item ("*", "a", "a-b", any of them "/n") allows."""
    if not item:
        raise ValueError("empty item in list")
    base, slash, step_text = item.partition("/")
    step = _cron_step(step_text) if slash else 1
    if base == "*":
        first, last = low, high
    else:
        first_text, dash, last_text = base.partition("-")
        first = _cron_number(first_text, name, low, high)
        if dash:
            last = _cron_number(last_text, name, low, high)
        elif slash:
            last = high  # "a/n" runs from a to the field's end, as in Vixie cron
        else:
            last = first
        if last < first:
            hint = " (a range through Sunday ends in 7)" if name == "day-of-week" else ""
            raise ValueError(f"range {base} is reversed; write the smaller end first{hint}")
    return range(first, last + 1, step)


def _cron_step(text):
    """Return the step after a "/", a whole number of at least 1."""
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise ValueError(f"step {text!r} must be a whole number of at least 1")
    return int(text)


def _cron_number(text, name, low, high):
    """Return a field value given as a number or (month, weekday) a name."""
    names = _CRON_NAMES.get(name, {})
    if text.lower() in names:
        return names[text.lower()]
    if not (text.isascii() and text.isdigit()):
        hint = f" or a name ({'jan-dec' if name == 'month' else 'sun-sat'})" if names else ""
        raise ValueError(f"{text!r} is not a number{hint}")
    if not low <= int(text) <= high:
        raise ValueError(f"{text} is out of range {low}-{high}")
    return int(text)


def _cron_clock_kind(zone, wall):
    """Say whether naive `wall` is "skipped", "repeated" or "normal" in `zone`."""
    first = wall.replace(tzinfo=zone, fold=0)
    if first.utcoffset() == first.replace(fold=1).utcoffset():
        return "normal"
    back = first.astimezone(datetime.timezone.utc).astimezone(zone).replace(tzinfo=None)
    return "repeated" if back == wall else "skipped"


def _cron_transition(zone, wall):
    """Return the instant (UTC) of the offset change that skips or repeats `wall`."""
    wall = wall.replace(microsecond=0)
    # The two readings of `wall` (fold 0 and 1) fall either side of the change;
    # zoneinfo does not expose transitions, so bisect between them.
    low, high = sorted(wall.replace(tzinfo=zone, fold=fold).astimezone(
        datetime.timezone.utc) for fold in (0, 1))
    new_offset = high.astimezone(zone).utcoffset()
    second = datetime.timedelta(seconds=1)
    while high - low > second:  # tzdata transitions fall on whole seconds
        middle = low + (high - low) // second // 2 * second
        if middle.astimezone(zone).utcoffset() == new_offset:
            high = middle
        else:
            low = middle
    return high


def _cron_fold_end(zone, wall):
    """Return the first wall-clock time after the repeated stretch holding `wall`."""
    change = _cron_transition(zone, wall)
    old_offset = wall.replace(tzinfo=zone, fold=0).utcoffset()
    return change.replace(tzinfo=None) + old_offset


# --- The worker --------------------------------------------------------------

IDLE_POLL = 0.001  # seconds between PRAGMA data_version checks of an idle worker
TICK = 0.05  # seconds between the supervisor's checks of its processes
SLOT_JOB, SLOT_TOKEN, SLOT_DEADLINE, SLOT_TIMEOUT = range(4)  # a process's shared slot
MAX_BATCH = 64  # steps a worker process claims at once when the queue is deep
BATCH_TIME = 0.005  # seconds of work a batch may hold before its results are committed
QUICK_STEP = 0.001  # seconds: a task usually this quick may have its result batched


def _import_modules(names):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise Error(f"cannot import {name!r}: {type(exc).__name__}: {exc}") from None


class Worker:
    """The supervisor of `python -m litetq worker`: runs `concurrency` worker processes,
    replaces dead ones, kills steps over their timeout, runs the cron table and
    requeues the steps of workers that vanished."""

    def __init__(self, path, queues=None, concurrency=None, imports=(), burst=False,
                 reload=False, cron=True, grace=30.0, lease=DEFAULT_LEASE,
                 start_method=None, log_config=(None, "INFO")):
        self.path, self.queues, self.imports = path, queues or None, list(imports)
        self.concurrency = concurrency or os.cpu_count() or 1
        self.burst, self.reload, self.cron, self.grace, self.lease = (
            burst, reload, cron, grace, lease)
        self.context = multiprocessing.get_context(start_method)
        self.log_config = log_config
        self.signals = 0  # set by the signal handlers, read by the loop
        self.children = []  # [process, slot] per worker process

    def run(self):
        """Supervise until a signal (or, with burst, until nothing is due); returns 0."""
        _import_modules(self.imports)
        queue = Queue(self.path, lease=self.lease)
        self.queue, self.worker_id = queue, f"{socket.gethostname()}:{os.getpid()}"
        self._register_periodic()
        watched = self._watched_files() if self.reload else {}
        queue.storage.register_worker(self.worker_id, ",".join(self.queues or ["*"]),
                                      self.concurrency)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.stop = self.context.Event()
        self.children = [self._start_child(None) for _ in range(self.concurrency)]
        logger.info("worker %s: %d processes on %s, queues %s", self.worker_id,
                    self.concurrency, self.path, ",".join(self.queues or ["all"]))
        try:
            restart = self._supervise(watched)
        finally:
            self._shut_down()
        if restart:
            logger.info("source changed: restarting")
            os.execv(sys.executable, [sys.executable, "-m", "litetq", *sys.argv[1:]])
        return 0

    def _on_signal(self, signum, frame):
        self.signals += 1  # only a flag: logging or I/O here can deadlock

    def _supervise(self, watched):
        """The loop; returns True when a source change asks for a restart."""
        next_second, idle_ticks = 0.0, 0
        while not self.signals:
            time.sleep(TICK)
            self._check_children()
            if time.monotonic() >= next_second:
                next_second = time.monotonic() + 1.0
                self._every_second()
                if watched and self._watched_files() != watched:
                    return True
            if self.burst:
                idle_ticks = idle_ticks + 1 if self._idle() else 0
                if idle_ticks >= 2:
                    logger.info("burst: nothing is due, exiting")
                    return False
        logger.info("signal received: finishing running steps (grace %g s)", self.grace)
        return False

    def _every_second(self):
        storage = self.queue.storage
        try:
            storage.heartbeat(self.worker_id)
            storage.reap()
            if self.cron:
                for job in self.queue.fire_due():
                    logger.info("cron: enqueued job %s %r", job.id, job.task)
        except (Error, sqlite3.Error) as exc:  # a locked or busy database: try next second
            logger.warning("supervisor: %s", exc)

    def _idle(self):
        """Burst mode: nothing due in our queues and none of our processes busy."""
        workers = [f"{socket.gethostname()}:{process.pid}" for process, _ in self.children]
        return not self.queue.storage.has_work(self.queues, workers) and not self._messages_due()

    def _messages_due(self):
        names = [name for name in _consumers if not self.queues or name in self.queues]
        return bool(names) and self.queue.storage.messages_due(names)

    def _start_child(self, slot):
        slot = slot or self.context.Array("d", 4, lock=False)
        slot[SLOT_JOB] = 0
        process = self.context.Process(
            target=_worker_process, name="litetq-worker", daemon=True,
            args=(self.path, self.queues, self.imports, self.lease, slot, self.stop,
                  os.getpid(), self.log_config))
        process.start()
        return [process, slot]

    def _check_children(self):
        """Replace dead processes and kill overdue steps. A step whose process died is
        run again, uncounted (its third loss fails it); a timed-out step has failed an
        attempt, and its retries apply."""
        for child in self.children:
            process, slot = child
            job_id, token = int(slot[SLOT_JOB]), slot[SLOT_TOKEN]
            if not process.is_alive():
                if job_id:
                    self._log_step(job_id, self.queue.storage.lose(
                        job_id, token, _exit_message(process.exitcode)))
                self._replace(child)
            elif job_id and slot[SLOT_DEADLINE] and time.monotonic() > slot[SLOT_DEADLINE]:
                process.kill()
                process.join()
                self._log_step(job_id, self.queue._fail_claim(
                    job_id, token, f"timed out after {slot[SLOT_TIMEOUT]:g} s"))
                self._replace(child)

    def _replace(self, child):
        """Start a new process in a dead one's place; give back the steps it had
        claimed but not begun (not counted as attempts)."""
        process, slot = child
        self.queue.storage.release(f"{socket.gethostname()}:{process.pid}")
        child[:] = self._start_child(slot)

    def _log_step(self, job_id, status):
        """The log line of a step that ended with its process."""
        if status is None:  # it had finished after all
            return
        row = self.queue.storage.job(job_id)
        logger.warning("job %s %s: %s (%s)", job_id, row["name"], status, row["error"])
        self.queue._notify()

    def _shut_down(self):
        """Let running steps finish within the grace period, then requeue the rest."""
        self.stop.set()
        deadline = time.monotonic() + self.grace
        while any(p.is_alive() for p, _ in self.children) and self.signals < 2:
            if time.monotonic() > deadline:
                break
            time.sleep(TICK)
        for process, slot in self.children:
            if process.is_alive():
                process.kill()
                process.join()
                if slot[SLOT_JOB]:
                    logger.info("job %d: requeued (worker stopping)", slot[SLOT_JOB])
                self.queue.storage.release(f"{socket.gethostname()}:{process.pid}")
        with contextlib.suppress(Error, sqlite3.Error):
            self.queue.storage.unregister_worker(self.worker_id)
        self.queue.close()

    def _register_periodic(self):
        for spec, name, tz, queue, function in _periodic:
            self.queue.schedule(name, spec, function(), tz=tz, queue=queue)

    def _watched_files(self):
        """Modification times of the source files of the modules we imported."""
        times = {}
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if path and not path.startswith((sys.prefix, sys.base_prefix)):
                with contextlib.suppress(OSError):
                    times[path] = os.stat(path).st_mtime
        return times


def _exit_message(code):
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"worker process killed by signal {-code} ({signal.Signals(-code).name})"
    return f"worker process died with exit code {code}"


def _worker_process(path, queues, imports, lease, slot, stop, supervisor, log_config):
    """A worker process: claim a step, run it, record it; until told to stop."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the supervisor decides when we stop
        signal.signal(sig, signal.SIG_IGN)
    if multiprocessing.get_start_method() != "fork":
        _configure_logging(*log_config)
    _import_modules(imports)
    queue = Queue(path, lease=lease)
    worker_id, batch = queue.worker_id, 1
    while not stop.is_set() and os.getppid() == supervisor:
        claims = queue.storage.claim(worker_id, lease, queues, limit=batch)
        if claims:
            batch = _run_batch(queue, claims, slot, batch, stop)
        elif not queue._consume_one(queues):
            _sleep_until_work(queue, queues, stop)
    queue.close()


def _run_batch(queue, claims, slot, batch, stop):
    """Run claimed steps; quick ones have their results committed together. Returns
    the next batch size: doubled while the queue is deep and steps are quick, so one
    transaction claims many steps, never more than BATCH_TIME of work."""
    started = time.monotonic()
    for claim in claims:
        queue._claims[claim.id] = claim.started
    try:
        for done, claim in enumerate(claims):
            if stop.is_set():  # shutting down: give back the steps not begun
                for unbegun in claims[done:]:
                    queue.storage.requeue(unbegun.id, unbegun.started)
                    queue._claims.pop(unbegun.id, None)
                break
            _run_reported(queue, claim, slot)
    finally:
        queue._save_finished()
    if len(claims) < batch:  # the queue ran dry
        return len(claims)
    per_step = (time.monotonic() - started) / len(claims)
    return max(1, min(batch * 2, MAX_BATCH, int(BATCH_TIME / per_step)))


def _run_reported(queue, claim, slot):
    """Run a claimed step, telling the supervisor what runs and until when it may."""
    job_id, name, token = claim.id, claim.name, claim.started
    with contextlib.suppress(Error):  # an unknown task fails in _run_step, not here
        function = None
        function = _lookup_task(name)
    timeout = function.timeout if function and function.timeout else 0
    expected = queue._durations.get(name)
    # Results wait for the batch's commit only behind steps known to be quick, and
    # never behind a step that may be killed.
    if timeout or expected is None or expected > QUICK_STEP:
        queue._save_finished()
    started = time.monotonic()
    slot[SLOT_TOKEN], slot[SLOT_TIMEOUT] = token, timeout
    slot[SLOT_DEADLINE] = started + timeout if timeout else 0
    slot[SLOT_JOB] = job_id
    status = queue._run_step(claim, defer=True)
    slot[SLOT_JOB] = 0
    took = time.monotonic() - started
    queue._durations[name] = took if expected is None else 0.8 * expected + 0.2 * took
    logger.info("job %s %s: %s in %.1f ms", job_id, name, status, took * 1000)


def _sleep_until_work(queue, queues, stop):
    """Sleep until another connection commits (cheap PRAGMA data_version checks), the
    next delayed job is due, or a second passes."""
    storage = queue.storage
    version = storage.data_version()
    next_due = storage.next_due(queues)
    wait = 1.0 if next_due is None else min(1.0, max(0.0, next_due - time.time()))
    until = time.monotonic() + wait
    while time.monotonic() < until and not stop.is_set():
        time.sleep(IDLE_POLL)
        if storage.data_version() != version:
            return


# --- The web page ------------------------------------------------------------
#
# `python -m litetq web DB` serves one self-contained page and a small JSON
# API with http.server. The page itself is static: all job data reaches it as
# JSON and goes into the DOM as text nodes, so nothing a task stored (args,
# errors, log lines, queue names) is ever parsed as HTML.

_WEB_STATUSES = UNFINISHED + TERMINAL
_WEB_RETRYABLE = ("failed", "cancelled", "expired")
_WEB_MAX_LIMIT = 1000
_WEB_MAX_BODY = 64 * 1024


class _WebError(Exception):
    """An HTTP error answered as ``{"error": message}``."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def make_web_server(queue, host="127.0.0.1", port=8765, token=None):
    """Return a ThreadingHTTPServer with the dashboard and JSON API for *queue*.

    Binds *host* at once; call ``serve_forever()`` to answer (``port=0``
    picks a free port, read it from ``server.server_port``). On any address
    but loopback a *token* is required; given a token, every POST must carry
    ``Authorization: Bearer TOKEN``.
    """
    loopback = _is_loopback(host)
    if not loopback and not token:
        raise ValueError(
            f"refusing to serve the litetq web page on {host!r} without a "
            "token: anyone who can reach that address could retry or cancel "
            "jobs. Pass token=... (litetq web --token T) or bind 127.0.0.1.")
    cls = _WebServer6 if ":" in host else http.server.ThreadingHTTPServer
    server = cls((host, port), _WebHandler)
    server.queue, server.token, server.loopback = queue, token, loopback
    return server


def serve_web(queue, host="127.0.0.1", port=8765, token=None):
    """Serve the dashboard until Ctrl-C; this is ``python -m litetq web``."""
    with make_web_server(queue, host, port, token) as server:
        shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
        print(f"litetq web: http://{shown}:{server.server_port}/ "
              "(Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def _is_loopback(host):
    """True for localhost and 127.0.0.0/8 / ::1 (with or without brackets)."""
    host = (host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (all interfaces): not loopback
        return False


class _WebServer6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _is_digits(text):
    # str.isdigit() alone also accepts "²" and other non-ASCII digits.
    return text.isascii() and text.isdigit()


# JSON API: each route maps (method, path pattern) to a function
# f(queue, query, *groups) returning a JSON-ready value.

def _api_stats(queue, query):
    _query_params(query, ())
    return queue.stats()


def _api_jobs(queue, query):
    params = _query_params(query, ("status", "queue", "task", "limit"))
    status = params.get("status")
    if status is not None and status not in _WEB_STATUSES:
        raise _WebError(400, f"unknown status {status!r}; use one of "
                             f"{', '.join(_WEB_STATUSES)}")
    limit = _int_param(params.get("limit", "100"), "limit", 1, _WEB_MAX_LIMIT)
    jobs = queue.jobs(status=status, queue=params.get("queue"),
                      task=params.get("task"), limit=limit)
    return [job.to_dict() for job in jobs]


def _api_job(queue, query, job_id):
    _query_params(query, ())
    return _job_detail(queue.job(_job_id(job_id)))


def _api_action(queue, query, job_id, action):
    """POST /api/jobs/ID/retry|cancel: answer 409 when the state forbids it."""
    job = queue.job(_job_id(job_id))
    status = job.status
    if action == "retry" and status not in _WEB_RETRYABLE:
        raise _WebError(409, f"job {job.id} is {status}; only failed, "
                             "cancelled or expired jobs can be retried")
    if action == "cancel" and status in TERMINAL:
        raise _WebError(409, f"job {job.id} is already {status}")
    try:
        changed = getattr(job, action)()
    except NotFound:
        raise
    except Error as exc:
        raise _WebError(409, str(exc)) from exc
    if changed is False:  # a worker moved the job on since we looked
        raise _WebError(409, f"job {job.id} is now {job.status}; nothing to {action}")
    return job.to_dict()


def _api_schedules(queue, query):
    _query_params(query, ())
    return [dict(entry, task=repr(entry["task"])) for entry in queue.schedules()]


_WEB_ROUTES = (
    ("GET", re.compile(r"/api/stats"), _api_stats),
    ("GET", re.compile(r"/api/jobs"), _api_jobs),
    ("GET", re.compile(r"/api/jobs/([^/]+)"), _api_job),
    ("POST", re.compile(r"/api/jobs/([^/]+)/(retry|cancel)"), _api_action),
    ("GET", re.compile(r"/api/schedules"), _api_schedules),
)


def _job_detail(job):
    """to_dict() plus what only the detail view needs: logs and child ids."""
    detail = job.to_dict()
    detail["logs"] = job.logs()
    detail["children"] = [child.id for child in job.children()]
    return detail


def _job_id(text):
    if not _is_digits(text):
        raise _WebError(400, f"job id must be a positive integer, not {text!r}")
    return int(text)


def _query_params(query, allowed):
    """Parse a query string into {name: value}; blank values count as absent."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True,
                                       strict_parsing=bool(query))
    except ValueError:
        raise _WebError(400, f"malformed query string {query!r}") from None
    params = {}
    for name, value in pairs:
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise _WebError(400, f"unknown parameter {name!r} (known: {known})")
        if name in params:
            raise _WebError(400, f"parameter {name!r} given twice")
        if value != "":
            params[name] = value
    return params


def _int_param(text, name, low, high):
    if not _is_digits(text) or not low <= int(text) <= high:
        raise _WebError(400, f"{name} must be an integer from {low} to "
                             f"{high}, not {text!r}")
    return int(text)


def _route(method, path):
    """Find the route for *path*; 404 if none, 405 if only other methods fit."""
    allowed = []
    for route_method, pattern, func in _WEB_ROUTES:
        match = pattern.fullmatch(path)
        if match and route_method == method:
            return func, match.groups()
        if match:
            allowed.append(route_method)
    if path == "/":
        allowed.append("GET")
    if allowed:
        raise _WebError(405, f"{method} is not allowed on {path}; use "
                             f"{' or '.join(allowed)}",
                        {"Allow": ", ".join(allowed)})
    raise _WebError(404, f"no such page or API route: {path}")


class _WebHandler(http.server.BaseHTTPRequestHandler):
    """Routes requests; every answer but the page is JSON."""

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    def version_string(self):
        return "litetq"

    def log_message(self, format, *args):
        # Access logs go to the library logger at debug, not to stderr.
        logger.debug("web %s " + format, self.address_string(), *args)

    def _dispatch(self):
        url = urllib.parse.urlsplit(self.path)
        method = "GET" if self.command == "HEAD" else self.command  # _send drops the body
        try:
            self._check_host()
            if url.path == "/" and method == "GET":
                return self._send(200, _WEB_PAGE, "text/html; charset=utf-8",
                                  _WEB_PAGE_HEADERS)
            func, groups = _route(method, url.path)
            if method == "POST":
                self._check_post()
            self._send_json(200, func(self.server.queue, url.query, *groups))
        except _WebError as exc:
            self._send_json(exc.status, {"error": exc.message}, exc.headers)
        except NotFound as exc:
            self._send_json(404, {"error": str(exc)})
        except Exception as exc:  # keep serving; the log has the traceback
            logger.exception("web: %s %s failed", self.command, self.path)
            self._send_json(500, {"error": f"internal error: {exc}"})

    def _check_host(self):
        # DNS rebinding: a foreign site whose name resolves to 127.0.0.1
        # would count as same-origin in the browser, so a loopback server
        # answers only requests addressed to a loopback name.
        host = self.headers.get("Host")
        if self.server.loopback and host is not None:
            name = urllib.parse.urlsplit("//" + host).hostname
            if not _is_loopback(name):
                raise _WebError(403, f"unexpected Host header {host!r}: this "
                                     "server answers only to localhost")

    def _check_post(self):
        """Token first, then the cross-site request guards."""
        self._read_body()
        token = self.server.token
        if token and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode(),
                f"Bearer {token}".encode()):
            raise _WebError(401, "POST needs the header 'Authorization: "
                                 "Bearer TOKEN' with this server's token",
                            {"WWW-Authenticate": 'Bearer realm="litetq"'})
        if self._cross_site():
            raise _WebError(403, "cross-site POST refused")
        # A form on another site can send neither a JSON content type nor a
        # custom header without a CORS preflight, which this server refuses.
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype != "application/json" and "X-Litetq" not in self.headers:
            raise _WebError(403, "POST needs 'Content-Type: application/json' "
                                 "or an 'X-Litetq: 1' header")

    def _cross_site(self):
        """True when the browser says the request comes from another origin."""
        site = self.headers.get("Sec-Fetch-Site")
        if site not in (None, "same-origin", "none"):
            return True
        origin = self.headers.get("Origin")
        if origin is None:
            return False  # not a browser, or a same-origin GET-like request
        netloc = urllib.parse.urlsplit(origin).netloc.lower()
        return netloc != self.headers.get("Host", "").lower()

    def _read_body(self):
        # The body is ignored, but reading it keeps the socket clean.
        length = self.headers.get("Content-Length", "0")
        if not _is_digits(length) or int(length) > _WEB_MAX_BODY:
            raise _WebError(413, f"the request body must be at most "
                                 f"{_WEB_MAX_BODY} bytes, not {length!r}")
        self.rfile.read(int(length))

    def _send_json(self, status, obj, headers=None):
        body = json.dumps(obj, default=str).encode()
        self._send(status, body, "application/json; charset=utf-8", headers)

    def _send(self, status, body, ctype, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


_WEB_CSS = """
:root { --fg:#1d2330; --muted:#6b7385; --line:#e3e6ec; --bg:#f6f7f9;
  --card:#fff; --accent:#3563d6; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;
  color:var(--fg); background:var(--bg); }
header { display:flex; align-items:baseline; gap:1em; padding:14px 24px;
  background:#1d2330; color:#fff; }
header h1 { margin:0; font-size:20px; letter-spacing:.5px; }
#status { color:#aab2c5; font-size:13px; }
#status.bad { color:#ff9b8f; }
main { max-width:1200px; margin:0 auto; padding:16px 24px 40px; }
section { background:var(--card); border:1px solid var(--line);
  border-radius:8px; margin:0 0 16px; padding:12px 16px; }
h2 { font-size:15px; margin:0 0 8px; }
h2 .count { color:var(--muted); font-weight:normal; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line);
  vertical-align:middle; }
th { font-size:12px; color:var(--muted); font-weight:600;
  text-transform:uppercase; letter-spacing:.4px; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
td.zero { color:#c3c8d2; }
.task { font-family:ui-monospace,Menlo,Consolas,monospace; font-size:13px;
  max-width:420px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.muted, .empty { color:var(--muted); }
.badge { display:inline-block; padding:0 7px; border-radius:9px; font-size:12px;
  background:#eef0f4; color:#444; }
.s-queued { background:#e8eefc; color:#2c4fa8; }
.s-running { background:#e3f4fb; color:#0d6f96; }
.s-waiting { background:#f1e9fb; color:#6a3fa8; }
.s-complete { background:#e5f5e8; color:#237a36; }
.s-failed { background:#fde8e6; color:#b3261e; }
.s-cancelled, .s-expired { background:#efefef; color:#666; }
.bar { width:160px; height:10px; background:#e9ecf1; border-radius:5px;
  overflow:hidden; display:inline-block; vertical-align:middle; }
.bar > div { height:100%; background:var(--accent); }
.bar.unknown > div { width:100%; opacity:.35; }
button { font:inherit; font-size:12px; padding:2px 10px; border-radius:5px;
  border:1px solid #c9ceda; background:#fff; cursor:pointer; }
button:hover { border-color:var(--accent); color:var(--accent); }
button.danger:hover { border-color:#b3261e; color:#b3261e; }
a.job { color:var(--accent); text-decoration:none; cursor:pointer; }
.failure { border-top:1px solid var(--line); padding:8px 0; }
.failure:first-of-type { border-top:0; }
.failure .head, h2.title { display:flex; gap:10px; align-items:center; }
h2.title > button { margin-left:auto; }
.actions button + button { margin-left:4px; }
.failure .error { color:#b3261e; margin:2px 0; white-space:pre-wrap;
  word-break:break-word; }
pre { background:#f3f4f7; border:1px solid var(--line); border-radius:6px;
  padding:8px 10px; overflow:auto; max-height:320px; font-size:12px;
  white-space:pre-wrap; word-break:break-word; }
details summary { cursor:pointer; color:var(--muted); font-size:12px; }
dialog { border:1px solid var(--line); border-radius:10px; padding:0;
  width:min(900px,94vw); max-height:88vh; }
dialog .inner { padding:14px 18px; }
dialog dl { display:grid; grid-template-columns:110px 1fr; gap:3px 12px;
  margin:0 0 10px; }
dialog dt { color:var(--muted); }
dialog dd { margin:0; word-break:break-word; }
.toast { position:fixed; bottom:16px; right:16px; background:#1d2330;
  color:#fff; padding:8px 14px; border-radius:6px; max-width:60vw; }
"""

_WEB_JS = r"""
"use strict";
// Everything below builds the DOM with createElement and text nodes: job
// data is never handed to innerHTML, so stored markup stays inert text.
const STATUSES = ["queued", "running", "waiting", "complete", "failed",
                  "cancelled", "expired"];
const openTracebacks = new Set();
let token = sessionStorage.getItem("litetq-token");

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function fill(id, ...children) {
  document.getElementById(id).replaceChildren(...children.flat());
}

function when(epoch) {
  if (epoch === null || epoch === undefined) return el("span", {className: "muted"}, "—");
  const secs = Math.round(epoch - Date.now() / 1000);
  const abs = Math.abs(secs);
  const text = abs < 60 ? abs + "s" : abs < 3600 ? Math.round(abs / 60) + "m"
    : abs < 86400 ? Math.round(abs / 3600) + "h" : Math.round(abs / 86400) + "d";
  return el("span", {title: new Date(epoch * 1000).toLocaleString()},
            secs > 0 ? "in " + text : text + " ago");
}

function badge(status) {
  return el("span", {className: "badge s-" + status}, status);
}

function jobLink(id) {
  return el("a", {className: "job", href: "#job=" + Number(id)}, "#" + Number(id));
}

function taskCell(job) {
  return el("td", {className: "task", title: job.task}, job.task);
}

function bar(progress) {
  if (!progress) return el("span", {className: "muted"}, "—");
  const [done, total] = progress;
  if (!total) return el("span", {}, el("span", {className: "bar unknown"}, el("div")), " " + done);
  const inner = el("div");
  inner.style.width = Math.max(0, Math.min(100, 100 * done / total)) + "%";
  return el("span", {}, el("span", {className: "bar"}, inner), ` ${done}/${total}`);
}

function actions(job, tag = "td") {
  const buttons = [];
  if (["queued", "waiting", "running"].includes(job.status)) {
    buttons.push(el("button", {className: "danger", onclick: () => act(job.id, "cancel")},
                    "Cancel"));
  }
  if (["failed", "cancelled", "expired"].includes(job.status)) {
    buttons.push(el("button", {onclick: () => act(job.id, "retry")}, "Retry"));
  }
  return el(tag, {className: "actions"}, buttons);
}

function table(headers, rows, empty) {
  // A header written with a leading space heads a right-aligned number column.
  if (!rows.length) return el("p", {className: "empty"}, empty);
  const head = el("tr", {}, headers.map(
    h => el("th", {className: h.startsWith(" ") ? "num" : ""}, h.trim())));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, rows));
}

function toast(message) {
  const node = el("div", {className: "toast"}, message);
  document.body.append(node);
  setTimeout(() => node.remove(), 4000);
}

async function api(path, options) {
  const resp = await fetch(path, options);
  const body = await resp.json().catch(() => ({error: resp.statusText}));
  if (!resp.ok) {
    throw Object.assign(new Error(body.error || resp.statusText), {status: resp.status});
  }
  return body;
}

async function act(id, action) {
  // The JSON content type and the custom header make this a request that
  // no other site can send here without a CORS preflight.
  const headers = {"Content-Type": "application/json", "X-Litetq": "1"};
  if (token) headers.Authorization = "Bearer " + token;
  try {
    await api(`/api/jobs/${Number(id)}/${action}`, {method: "POST", headers, body: "{}"});
  } catch (err) {
    if (err.status !== 401) return toast(err.message);
    const given = prompt("This server needs its token to " + action + " jobs:");
    if (!given) return;
    token = given;
    sessionStorage.setItem("litetq-token", token);
    return act(id, action);
  }
  refresh();
  const dialog = document.getElementById("detail");
  if (dialog.open && dialog.dataset.job === String(id)) showJob(id);
}

function renderQueues(stats) {
  const names = Object.keys(stats).sort();
  const rows = names.map(name => {
    const counts = stats[name];
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    return el("tr", {}, el("td", {}, name),
      STATUSES.map(s => el("td", {className: "num" + (counts[s] ? "" : " zero")}, counts[s] || 0)),
      el("td", {className: "num"}, total));
  });
  fill("queues", table(["queue", ...STATUSES.map(s => " " + s), " total"], rows, "No jobs yet."));
}

function renderRunning(jobs) {
  document.getElementById("running-count").textContent = jobs.length ? `(${jobs.length})` : "";
  const rows = jobs.map(job => el("tr", {}, el("td", {}, jobLink(job.id)), taskCell(job),
    el("td", {}, job.queue), el("td", {}, bar(job.progress)),
    el("td", {className: "num"}, job.attempts), el("td", {}, when(job.started)), actions(job)));
  fill("running", table(["id", "task", "queue", "progress", " attempt", "started", ""], rows,
                        "Nothing running."));
}

function renderFailures(jobs) {
  document.getElementById("failures-count").textContent = jobs.length ? `(${jobs.length})` : "";
  if (!jobs.length) return fill("failures", el("p", {className: "empty"}, "No failures."));
  fill("failures", jobs.map(job => {
    const details = el("details", {open: openTracebacks.has(job.id),
      ontoggle: () => details.open ? openTracebacks.add(job.id) : openTracebacks.delete(job.id)},
      el("summary", {}, "traceback"), el("pre", {}, job.traceback || "(none stored)"));
    return el("div", {className: "failure"},
      el("div", {className: "head"}, jobLink(job.id),
         el("span", {className: "task", title: job.task}, job.task),
         el("span", {className: "muted"}, job.queue), when(job.finished), actions(job, "span")),
      el("div", {className: "error"}, job.error || ""), details);
  }));
}

function renderRecent(jobs) {
  const rows = jobs.map(job => el("tr", {}, el("td", {}, jobLink(job.id)),
    el("td", {}, badge(job.status)), taskCell(job), el("td", {}, job.queue),
    el("td", {}, bar(job.progress)), el("td", {className: "num"}, job.attempts),
    el("td", {}, when(job.created)), actions(job)));
  fill("recent", table(["id", "status", "task", "queue", "progress", " attempts", "created", ""],
                       rows, "No jobs yet."));
}

function renderSchedules(entries) {
  const rows = entries.map(e => el("tr", {}, el("td", {}, e.name),
    el("td", {className: "task"}, e.spec), el("td", {className: "task", title: e.task}, e.task),
    el("td", {}, e.queue ?? el("span", {className: "muted"}, "task's queue")),
    el("td", {}, e.tz || "UTC"),
    el("td", {}, when(e.next_run)), el("td", {}, when(e.last_run))));
  fill("schedules", table(["name", "spec", "task", "queue", "tz", "next run", "last run"], rows,
                          "No schedules."));
}

function field(name, value) {
  return [el("dt", {}, name), el("dd", {}, value === null || value === undefined ? "—" : value)];
}

async function showJob(id) {
  const dialog = document.getElementById("detail");
  let job;
  try { job = await api("/api/jobs/" + Number(id)); } catch (err) { return toast(err.message); }
  const logs = job.logs.map(l => el("tr", {}, el("td", {}, when(l.time)), el("td", {}, l.level),
    el("td", {}, l.job_id === job.id ? "" : "#" + l.job_id), el("td", {}, l.message)));
  dialog.replaceChildren(el("div", {className: "inner"},
    el("h2", {className: "title"}, "Job #" + job.id, badge(job.status), actions(job, "span"),
       el("button", {onclick: () => dialog.close()}, "Close")),
    el("dl", {}, field("task", el("span", {className: "task"}, job.task)),
       field("queue", job.queue), field("priority", job.priority),
       field("attempts", job.attempts), field("steps", job.steps),
       field("progress", job.progress && bar(job.progress)),
       field("created", when(job.created)), field("started", when(job.started)),
       field("finished", when(job.finished)), field("due", when(job.due)),
       field("parent", job.parent_id && jobLink(job.parent_id)),
       field("children", job.children.length ? job.children.map(c => [jobLink(c), " "]) : null),
       field("error", job.error),
       field("result", job.result === null ? null : JSON.stringify(job.result))),
    job.traceback ? [el("h2", {}, "Traceback"), el("pre", {}, job.traceback)] : [],
    el("h2", {}, "Logs"), table(["time", "level", "job", "message"], logs, "No log lines.")));
  dialog.dataset.job = job.id;
  if (!dialog.open) dialog.showModal();
}

function fromHash() {
  const match = /^#job=(\d+)$/.exec(location.hash);
  if (match) showJob(match[1]);
}

async function refresh() {
  try {
    const [stats, running, failed, recent, schedules] = await Promise.all([
      api("/api/stats"), api("/api/jobs?status=running&limit=50"),
      api("/api/jobs?status=failed&limit=20"), api("/api/jobs?limit=30"),
      api("/api/schedules")]);
    renderQueues(stats); renderRunning(running); renderFailures(failed);
    renderRecent(recent); renderSchedules(schedules);
    setStatus("updated " + new Date().toLocaleTimeString(), false);
  } catch (err) {
    setStatus("cannot reach the server: " + err.message, true);
  }
}

function setStatus(text, bad) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.className = bad ? "bad" : "";
}

async function loop() {
  await refresh();
  setTimeout(loop, 2000);  // chained, so slow answers never pile up
}

document.getElementById("detail").addEventListener("close", () => {
  if (location.hash) history.replaceState(null, "", location.pathname);
});
window.addEventListener("hashchange", fromHash);
fromHash();
loop();
"""

_WEB_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>litetq</title><link rel="icon" href="data:,">
<style>{css}</style></head>
<body>
<header><h1>litetq</h1><span id="status">loading…</span></header>
<main>
<section><h2>Queues</h2><div id="queues"></div></section>
<section><h2>Running <span class="count" id="running-count"></span></h2>
<div id="running"></div></section>
<section><h2>Recent failures <span class="count" id="failures-count"></span></h2>
<div id="failures"></div></section>
<section><h2>Recent jobs</h2><div id="recent"></div></section>
<section><h2>Cron table</h2><div id="schedules"></div></section>
</main>
<dialog id="detail"></dialog>
<script>{js}</script>
</body></html>
"""


def _csp_hash(text):
    return "'sha256-%s'" % base64.b64encode(
        hashlib.sha256(text.encode()).digest()).decode()


_WEB_PAGE = _WEB_HTML.format(css=_WEB_CSS, js=_WEB_JS).encode()
# The policy allows only this page's own script and style (by hash), so even
# markup that slipped into the page could not run script or load anything.
_WEB_PAGE_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_csp_hash(_WEB_JS)}; "
        f"style-src {_csp_hash(_WEB_CSS)}; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


# --- The command line --------------------------------------------------------

class UsageError(Error):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr and exit 2, like every other bad input
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _duration(text):
    """'90', '90s', '15m', '12h', '7d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 15m, 12h, 7d)")


def _json_arg(text):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"malformed JSON {text!r}: {exc}")


def _bounded(kind, minimum=0.0, maximum=None):
    """An argparse type: a number of `kind` in [minimum, maximum]."""
    def parse(text):
        value = _duration(text) if kind is float else kind(text)
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range: must be at least {minimum:g}"
                + (f" and at most {maximum:g}" if maximum is not None else ""))
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _job_ids(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a job id: {text!r}")


def build_parser():
    parser = _Parser(prog="litetq", description="A durable task queue on SQLite.")
    parser.add_argument("--version", action="version", version=f"litetq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    def command(name, help, db=True):
        sub = commands.add_parser(name, help=help, description=help)
        if db:
            sub.add_argument("db", metavar="DB", help="the SQLite database file")
        return sub

    worker = command("worker", "run worker processes until stopped")
    worker.add_argument("--queues", help="comma-separated queues to consume (default: all)")
    worker.add_argument("--concurrency", type=_bounded(int, 1, 256),
                        default=os.cpu_count() or 1,
                        help="worker processes (default: CPU count)")
    worker.add_argument("--import", dest="imports", nargs="+", action="extend", default=[],
                        metavar="MOD", help="modules defining tasks, imported at start")
    worker.add_argument("--burst", action="store_true", help="exit when nothing is due")
    worker.add_argument("--reload", action="store_true",
                        help="restart when an imported module's source changes")
    worker.add_argument("--no-cron", dest="cron", action="store_false",
                        help="do not run the cron table in this worker")
    worker.add_argument("--logfile", help="log to this file instead of stderr")
    worker.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    worker.add_argument("--grace", type=_bounded(float, 0), default=30.0,
                        help="seconds running steps get to finish on SIGTERM (default 30)")
    worker.add_argument("--lease", type=_bounded(float, 0.1), default=DEFAULT_LEASE,
                        help=f"seconds before a dead worker's step runs again "
                             f"(default {DEFAULT_LEASE:g})")
    worker.add_argument("--start-method", choices=multiprocessing.get_all_start_methods(),
                        help="how worker processes start (default: the platform's)")

    command("status", "counts per queue and status, oldest wait, live workers")
    jobs = command("jobs", "list jobs, newest first")
    jobs.add_argument("--status", choices=UNFINISHED + TERMINAL)
    jobs.add_argument("--queue")
    jobs.add_argument("--task", help="task name")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true", help="JSON lines for scripts")
    show = command("show", "one job: arguments, status, error, traceback, logs, children")
    show.add_argument("id", type=_job_ids)
    show.add_argument("--json", action="store_true")
    retry = command("retry", "queue failed, cancelled or expired jobs again")
    retry.add_argument("ids", type=_job_ids, nargs="*", metavar="ID")
    retry.add_argument("--failed", action="store_true", help="every failed job")
    cancel = command("cancel", "cancel jobs (running ones when their step ends)")
    cancel.add_argument("ids", type=_job_ids, nargs="+", metavar="ID")
    purge = command("purge", "delete finished jobs")
    purge.add_argument("--status", default=",".join(TERMINAL),
                       help=f"comma-separated (default {','.join(TERMINAL)})")
    purge.add_argument("--older-than", type=_duration, default=0.0,
                       help="only jobs finished longer ago than this (e.g. 7d)")
    enqueue = command("enqueue", "enqueue a call of a registered task")
    enqueue.add_argument("task", metavar="TASK", help="task name, e.g. app.tasks.send")
    enqueue.add_argument("args", nargs="?", type=_json_arg, default=[], metavar="ARGS_JSON",
                         help="JSON list of positional arguments")
    enqueue.add_argument("--kwargs", type=_json_arg, default={}, help="JSON object")
    enqueue.add_argument("--queue")
    enqueue.add_argument("--delay", type=_duration)

    cron = command("cron", "the cron table: ls, add, rm")
    actions = cron.add_subparsers(dest="action", required=True, metavar="ACTION",
                                  parser_class=_Parser)
    actions.add_parser("ls", help="list entries with next and last runs")
    add = actions.add_parser("add", help="add or change an entry")
    add.add_argument("name")
    add.add_argument("spec", help="5 or 6 cron fields, quoted, or @daily etc.")
    add.add_argument("task", metavar="TASK")
    add.add_argument("args", nargs="?", type=_json_arg, default=[], metavar="ARGS_JSON")
    add.add_argument("--tz", help="zoneinfo name, e.g. Europe/Berlin (default UTC)")
    add.add_argument("--queue")
    remove = actions.add_parser("rm", help="remove an entry")
    remove.add_argument("name")

    web = command("web", "serve the dashboard and JSON API")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8765)
    web.add_argument("--token", help="required as 'Authorization: Bearer T' for POSTs")
    command("demo", "a tour on a temporary database, with real workers", db=False)
    return parser


def main(argv=None):
    """The `litetq` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "worker":
            sys.path.insert(0, os.getcwd())  # so --import finds the user's modules
            _configure_logging(args.logfile, args.log_level)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"litetq: {exc}", file=sys.stderr)
        return 2
    except (Error, ValueError, TypeError) as exc:
        print(f"litetq: error: {exc}", file=sys.stderr)
        return 2


class _Formatter(logging.Formatter):
    """Formats each second's timestamp once: a busy worker logs thousands of lines a
    second, and strftime was a quarter of its time."""

    _second, _text = None, ""

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._text},{int(record.msecs):03d}"


def _configure_logging(logfile=None, level="INFO"):
    handler = logging.FileHandler(logfile) if logfile else logging.StreamHandler()
    handler.setFormatter(_Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def _open(path, create=False):
    """The queue at `path`; admin commands refuse to create a database by mistake."""
    if not create and path != ":memory:" and not os.path.exists(path):
        raise UsageError(f"no database at {path!r}")
    return Queue(path)


def _cmd_worker(args):
    queues = [q for q in (args.queues or "").split(",") if q] or None
    worker = Worker(args.db, queues, args.concurrency, args.imports, args.burst, args.reload,
                    args.cron, args.grace, args.lease, args.start_method,
                    (args.logfile, args.log_level))
    return worker.run()


def _cmd_status(args):
    with _open(args.db) as queue:
        stats = queue.stats()
        statuses = UNFINISHED + TERMINAL
        rows = [[name, *(str(counts.get(s, 0)) for s in statuses)]
                for name, counts in sorted(stats.items())]
        _print_table(["queue", *statuses], rows or [["(no jobs)"] + [""] * len(statuses)])
        wait = queue.storage.oldest_wait()
        print(f"\noldest due job has waited {wait:.1f} s" if wait else "\nno job is waiting")
        now = time.time()
        workers = [[w[0], str(w[4]), w[3], "live" if now - w[6] < 10 else
                    f"lost ({now - w[6]:.0f} s without heartbeat)"]
                   for w in queue.storage.workers()]
        print()
        _print_table(["worker", "processes", "queues", "state"], workers or [["(none)"]])
    return 0


def _cmd_jobs(args):
    with _open(args.db) as queue:
        jobs = queue.jobs(args.status, args.queue, args.task, args.limit)
        infos = [job.to_dict() for job in jobs]
        if args.json:
            for info in infos:
                print(json.dumps(info))
            return 0
        _print_table(["id", "status", "queue", "task", "attempts", "steps", "age", "error"],
                     [[str(i["id"]), i["status"], i["queue"], _cut(i["task"], 40),
                       str(i["attempts"]), str(i["steps"]), _age(i["created"]),
                       _cut(i["error"] or "", 40)] for i in infos])
    return 0


def _cmd_show(args):
    with _open(args.db) as queue:
        job = queue.job(args.id)
        info = job.to_dict()
        info["logs"] = job.logs()
        info["children"] = [child.id for child in job.children()]
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        for key in ("id", "status", "queue", "priority", "task", "args", "kwargs",
                    "attempts", "steps", "progress", "parent_id", "children", "result",
                    "error"):
            if info[key] not in (None, [], {}):
                value = info[key]
                print(f"{key:>10}: {json.dumps(value) if key in ('args', 'kwargs') else value}")
        for key in ("created", "started", "finished"):
            if info[key]:
                print(f"{key:>10}: {_when(info[key])}")
        if info["traceback"]:
            print("\ntraceback:\n" + info["traceback"].rstrip())
        if info["logs"]:
            print("\nlogs:")
            for line in info["logs"]:
                print(f"  {_when(line['time'])} [{line['job_id']}] {line['level']}: "
                      f"{line['message']}")
    return 0


def _cmd_retry(args):
    if not args.ids and not args.failed:
        raise UsageError("give job ids or --failed")
    with _open(args.db) as queue:
        ids = args.ids + (queue.storage.jobs("failed", limit=-1) if args.failed else [])
        jobs = [queue.job(i) for i in ids]  # every id is checked before anything changes
        retried = [job.id for job in jobs if job.retry()]
        print(f"queued again: {' '.join(map(str, retried)) or 'none'}")
    return 0


def _cmd_cancel(args):
    with _open(args.db) as queue:
        jobs = [queue.job(i) for i in args.ids]
        cancelled = [job.id for job in jobs if job.cancel()]
        print(f"cancelled: {' '.join(map(str, cancelled)) or 'none'}")
    return 0


def _cmd_purge(args):
    statuses = [s for s in args.status.split(",") if s]
    unknown = set(statuses) - set(TERMINAL)
    if unknown:
        raise UsageError(f"can only purge finished jobs ({', '.join(TERMINAL)}), "
                         f"not {', '.join(sorted(unknown))}")
    with _open(args.db) as queue:
        count = queue.storage.purge(statuses, time.time() - args.older_than)
        print(f"purged {count} jobs")
    return 0


def _cmd_enqueue(args):
    if not isinstance(args.args, list) or not isinstance(args.kwargs, dict):
        raise UsageError("ARGS_JSON must be a JSON list and --kwargs a JSON object")
    sys.path.insert(0, os.getcwd())
    _lookup_task(args.task)  # unknown tasks are refused here, not in the worker
    with _open(args.db, create=True) as queue:
        job = queue.enqueue(Task(args.task, args.args, args.kwargs), queue=args.queue,
                            delay=args.delay)
        print(job.id)
    return 0


def _cmd_cron(args):
    if args.action == "add":  # bad input is refused before the database is touched
        if not isinstance(args.args, list):
            raise UsageError("ARGS_JSON must be a JSON list")
        Cron(args.spec, args.tz)
    with _open(args.db, create=args.action == "add") as queue:
        if args.action == "add":
            queue.schedule(args.name, args.spec, Task(args.task, args.args), tz=args.tz,
                           queue=args.queue)
            print(f"added {args.name}")
        elif args.action == "rm":
            if not queue.unschedule(args.name):
                raise UsageError(f"no cron entry named {args.name!r}")
            print(f"removed {args.name}")
        else:
            _print_table(["name", "spec", "tz", "task", "next run", "last run"],
                         [[e["name"], e["spec"], e["tz"] or "UTC", _cut(repr(e["task"]), 40),
                           _when(e["next_run"], e["tz"]), _when(e["last_run"], e["tz"])]
                          for e in queue.schedules()] or [["(empty)"]])
    return 0


def _cmd_web(args):
    with _open(args.db) as queue:
        serve_web(queue, args.host, args.port, args.token)
    return 0


def _print_table(headers, rows):
    widths = [max(len(str(r[i])) for r in [headers, *rows] if i < len(r))
              for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def _cut(text, width):
    return text if len(text) <= width else text[:width - 1] + "…"


def _when(epoch, tz=None):
    """An epoch time for people: local time, or in zone `tz`, with its UTC offset."""
    if epoch is None:
        return "-"
    zone = zoneinfo.ZoneInfo(tz) if tz else None
    moment = datetime.datetime.fromtimestamp(epoch, zone).astimezone(zone)
    return moment.strftime("%Y-%m-%d %H:%M:%S%z")


def _age(epoch):
    seconds = time.time() - epoch
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


DEMO_TASKS = '''\
import litetq


@litetq.task
def hello(name):
    return f"hello {name}!"


@litetq.task
def countdown(n):
    litetq.current().log(f"{n}...")
    return countdown(n - 1) if n else "liftoff"


@litetq.task(retries=2, retry_delay=0.2)
def flaky(x):
    if litetq.current().attempt == 1:
        raise ConnectionError("the network blinked")
    return x * 2


@litetq.task
def square(x):
    return x * x


@litetq.task
def fan_out(numbers):
    for n in numbers:
        litetq.current().spawn(square(n))
    return total()  # a continuation: runs once every subtask has finished


@litetq.task
def total():
    return sum(child.result() for child in litetq.current().job.children())
'''


def _cmd_demo(args):
    """Start a real worker on a temporary database and show the classics complete."""
    with tempfile.TemporaryDirectory(prefix="litetq-demo-") as folder:
        with open(os.path.join(folder, "demo_tasks.py"), "w") as f:
            f.write(DEMO_TASKS)
        sys.path.insert(0, folder)
        demo = importlib.import_module("demo_tasks")
        db = os.path.join(folder, "demo.sqlite")
        queue = use(Queue(db))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")]))
        command = [sys.executable, "-m", "litetq", "worker", db, "--import", "demo_tasks",
                   "--concurrency", "2", "--log-level", "WARNING"]
        print(f"litetq {__version__} demo on {db}\n"
              f"$ python -m litetq worker demo.sqlite --import demo_tasks --concurrency 2\n")
        worker = subprocess.Popen(command, cwd=folder, env=env)
        try:
            _demo_tour(demo, queue)
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=30)
            print(f"\nworker stopped on SIGTERM, exit status {code}")
            queue.close()
    return code


def _demo_tour(demo, queue):
    started = time.monotonic()

    def show(code, job, note=""):
        value = job.result(timeout=20)
        print(f"{code:<45} -> {value!r:<14} job {job.id}: {job.steps} step(s), "
              f"{job.attempts} attempt(s){note and note(job)}  "
              f"[{time.monotonic() - started:.2f} s]")
    show('hello.delay("world")', demo.hello.delay("world"))
    show("countdown.delay(3)", demo.countdown.delay(3))
    show('chain(hello("a"), countdown(1), hello("b"))',
         queue.enqueue(chain(demo.hello("a"), demo.countdown(1), demo.hello("b"))))
    show("flaky.delay(21)", demo.flaky.delay(21), lambda job: ", the 1st raised")
    show("fan_out.delay([1, 2, 3, 4])", demo.fan_out.delay([1, 2, 3, 4]),
         lambda job: f", subtasks {[child.id for child in job.children()]}")


COMMANDS = {"worker": _cmd_worker, "status": _cmd_status, "jobs": _cmd_jobs, "show": _cmd_show,
            "retry": _cmd_retry, "cancel": _cmd_cancel, "purge": _cmd_purge,
            "enqueue": _cmd_enqueue, "cron": _cmd_cron, "web": _cmd_web, "demo": _cmd_demo}


if __name__ == "__main__":
    # `python -m litetq` runs this file as __main__: hand over to the importable `litetq`
    # module, so user modules doing `import litetq` share one task registry with us.
    import litetq
    sys.exit(litetq.main())
