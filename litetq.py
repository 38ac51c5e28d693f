"""litetq: a durable background-task queue in one file, on SQLite and the standard library.

    producer (.delay(), q.enqueue(), cron) --> SQLite file (jobs, cron table, messages)
        --> supervisor (python -m litetq worker: cron, leases, timeouts)
        --> worker processes (claim a step, run it, commit its outcome) --> results

Every step of a job is committed before the next begins, so a killed worker loses
nothing: its lease lapses and another worker runs the step again.
"""

import argparse
import asyncio
import base64
import bisect
import calendar
import collections
import concurrent.futures
import contextlib
import contextvars
import datetime
import functools
import hashlib
import hmac
import http.server
import importlib
import inspect
import ipaddress
import json
import logging
import math
import multiprocessing
import os
import random
import re
import select
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
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
    "on",
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
OUTCOMES = ("complete", "continued", "retried", "failed", "cancelled", "expired")  # of a step
DEFAULT_LEASE = 10.0  # seconds a claimed step stays ours without renewal
MAX_RETRY_DELAY = 3600.0
MAX_LOST = 3  # a step whose worker died this many times fails as "worker lost"
WAIT_POLL = 0.01  # seconds between a waiter's looks at a job, at most
IDLE_POLL = 0.001  # seconds between looks for commits where nothing tells us of them
BUSY_TIMEOUT = 10.0  # seconds a write waits for SQLite's lock before it gives up
POOL_SIZE = 4  # idle connections a queue keeps for reuse
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


class _Unreachable(Error):
    """The database server could not be reached, or dropped the connection."""


class Fatal(Error):
    """Raise inside a task to fail its job at once, whatever retries remain."""


class Retry(Error):
    """Raise inside a task to ask for another attempt, after `delay` seconds or the backoff."""

    def __init__(self, delay=None):
        if delay is not None:
            delay = _seconds(delay, "Retry(delay)")
        super().__init__("retry requested" if delay is None else f"retry requested in {delay} s")
        self.delay = delay


# --- The codec: JSON with task references ------------------------------------

RESERVED = "__litetq__"  # marks encoded Tasks, and escapes user dicts that use the key
ALLOWED = "None, bool, int, float, str, list, tuple, dict with str keys and Task"
MAX_DEPTH = 100  # nesting levels a value may have: deeper, Python's own limits come near


class _Unencodable(Exception):
    """Internal: carries the offending value up the stack while the path is built."""

    def __init__(self, value, step="", depth=False):
        self.value, self.path, self.depth = value, [step] if step else [], depth


def _encode(value, depth=0):
    """Return `value` as plain JSON data; Tasks and reserved-key dicts get wrapped."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _Unencodable(value)
        return value
    if depth >= MAX_DEPTH:
        raise _Unencodable(value, depth=True)
    if kind is list or kind is tuple:
        return [_encode_at(item, f"[{i}]", depth) for i, item in enumerate(value)]
    if kind is dict:
        return _encode_dict(value, depth)
    if isinstance(value, dict):  # OrderedDict, defaultdict: stored as plain dicts
        return _encode_dict(value, depth)
    if isinstance(value, (list, tuple)):  # namedtuples come back as lists, like tuples
        return [_encode_at(item, f"[{i}]", depth) for i, item in enumerate(value)]
    if isinstance(value, Task):
        return {RESERVED: "task", "name": value.name,
                "args": _encode_at(list(value.args), ".args", depth),
                "kwargs": _encode_at(value.kwargs, ".kwargs", depth)}
    if isinstance(value, int):  # IntEnum and friends are stored as their plain value
        return int(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        return _encode(float(value))
    raise _Unencodable(value)


def _encode_at(value, step, depth):
    try:
        return _encode(value, depth + 1)
    except _Unencodable as exc:
        exc.path.append(step)
        raise


def _encode_dict(value, depth):
    out = {}
    for key, item in value.items():
        if type(key) is not str:
            raise _Unencodable(key, f"[{key!r}] (a dict key)")
        out[key] = _encode_at(item, f"[{key!r}]", depth)
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
        if len(path) > 80:
            path = path[:50] + "..." + path[-20:]
        if exc.depth:
            raise ValueError(f"cannot store {path}: values nest at most {MAX_DEPTH} "
                             f"lists, dicts and task references deep") from None
        raise TypeError(
            f"cannot store {type(exc.value).__name__} {_short_repr(exc.value)} at {path}: "
            f"litetq stores values as JSON ({ALLOWED})") from None
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:  # lone surrogates: escaped as \udcff, they round-trip
            text = json.dumps(data, separators=(",", ":"))
    return text


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


# Checks of what callers pass, shared by tasks, the queue and the command line.

def _clean_text(text):
    """Text any database stores: lone surrogates and NUL characters escaped."""
    text = str(text)
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _seconds(value, name, positive=False):
    """A finite number of seconds, at least 0 (or above it): else ValueError/TypeError."""
    value = _number(value, name)
    if value < 0 or positive and value == 0:
        raise ValueError(f"{name} must be {'above' if positive else 'at least'} 0, "
                         f"not {value!r}")
    return value


def _integer(value, name, low=-2 ** 63, high=2 ** 63 - 1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} "
                        f"{_short_repr(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, not {value}")
    return int(value)


def _number(value, name, kind="a number of seconds"):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__} "
                        f"{_short_repr(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, not {value!r}")
    return float(value)


def _name(value, what):
    """A queue name, unique key or entry name: a non-empty str a database can store."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__} "
                        f"{_short_repr(value)}")
    if not value or _clean_text(value) != value:
        raise ValueError(f"{what} must be a non-empty str without NUL characters or lone "
                         f"surrogates, not {value!r}")
    return value


# --- Tasks -------------------------------------------------------------------

_registry = {}   # task name -> TaskFunction
_consumers = {}  # raw payload queue name -> function(payload)
_periodic = []   # (spec, name, tz, queue, TaskFunction) written to the cron table by workers
_hooks = {"enqueued": [], "started": [], "retrying": [], "finished": []}  # event -> functions


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
        """Run the function once, here, and return what it returns (maybe a Task). An
        async task runs on an event loop of its own: outside a running one."""
        function = _lookup_task(self.name)
        if function.is_async:
            return _run_coroutine(_in_context(Context(), function.func, self.args,
                                              self.kwargs), f"{self!r}.run_once()")
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

    def arun_once(self):
        """`await ref.arun_once()`: run_once() inside an event loop; a sync task runs
        on a thread, so the loop never waits for it."""
        _running_loop(f"{self!r}.arun_once()")
        return self._arun_once()

    async def _arun_once(self):
        function = _lookup_task(self.name)
        if not function.is_async:
            return await asyncio.to_thread(self.run_once)
        return await _in_context(Context(), function.func, self.args, self.kwargs)

    def arun(self):
        """`await ref.arun()`: run() inside an event loop."""
        _running_loop(f"{self!r}.arun()")
        return self._arun()

    async def _arun(self):
        call, rest = _flatten(self, [])
        while True:
            value = await call._arun_once()
            call, rest, value = _advance(value, rest)
            if call is None:
                return value


async def _in_context(context, func, args, kwargs):
    """Await an async task's function with `context` as its current(). Set here, inside
    the coroutine, since the loop or thread that runs it has a context of its own (a
    context variable set around the call would be gone by the time it runs)."""
    token = _current.set(context)
    try:
        return await func(*args, **kwargs)
    finally:
        _current.reset(token)


def _running_loop(what):
    """The running event loop; RuntimeError saying what to do where there is none."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(f"{what} needs a running event loop: await it inside async code "
                           f"(outside one, use the sync form)") from None


def _run_coroutine(coroutine, what):
    """Run an async task's coroutine to its end from sync code: on a new event loop,
    or, where this thread already runs one, on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box = []
    thread = threading.Thread(target=lambda: box.append(_capture(asyncio.run, coroutine)),
                              name="litetq-run")
    thread.start()
    thread.join()
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _capture(function, *args):
    try:
        return "value", function(*args)
    except BaseException as exc:
        return "error", exc


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

    def __init__(self, func, name, queue, priority, retries, retry_delay, timeout, atomic, ttl,
                 concurrency, concurrency_key, rate):
        functools.update_wrapper(self, func)
        self.func, self.name, self.queue, self.priority = func, name, queue, priority
        self.retries, self.retry_delay, self.timeout = retries, retry_delay, timeout
        self.atomic, self.ttl = atomic, ttl
        self.concurrency, self.concurrency_key, self.rate = concurrency, concurrency_key, rate
        self.is_async = inspect.iscoroutinefunction(func)

    def __call__(self, *args, **kwargs):
        return Task(self.name, args, kwargs)

    def delay(self, *args, **kwargs):
        """Enqueue a call on the default queue (see `use()`); returns its `Job`."""
        return _default_queue().enqueue(Task(self.name, args, kwargs))

    async def adelay(self, *args, **kwargs):
        """`await task.adelay(...)`: delay() without blocking the event loop (nor does
        opening $LITETQ_DB's queue on first use, which may wait for a server)."""
        queue = _default if _default is not None else await asyncio.to_thread(_default_queue)
        return await queue.aenqueue(Task(self.name, args, kwargs))

    def __repr__(self):
        return f"<task {self.name}>"

    @property
    def limits(self):
        """(concurrency, starts per window, window seconds) as the claim reads them."""
        rate, per = self.rate or (None, None)
        return self.concurrency, rate, per

    def limit_key(self, call):
        """The key a step of `call` counts against, or None without a concurrency limit."""
        if self.concurrency is None:
            return None
        if self.concurrency_key is None:
            return self.name
        try:
            key = self.concurrency_key(*call.args, **call.kwargs)
        except Exception as exc:
            raise ValueError(f"concurrency_key of {self.name} raised {type(exc).__name__}: "
                             f"{exc}") from exc
        if not isinstance(key, str):
            raise TypeError(f"concurrency_key of {self.name} must return a str, not "
                            f"{type(key).__name__} {_short_repr(key)}")
        return f"{self.name}:{_name(key, 'the concurrency key')}"


def task(func=None, *, name=None, queue="default", priority=0, retries=0, retry_delay=1.0,
         timeout=None, atomic=False, ttl=None, concurrency=None, concurrency_key=None,
         rate=None):
    """Register a function as a task: `@task` or `@task(retries=3, timeout=30, ...)`."""
    options = (_name(queue, "queue"), _integer(priority, "priority"),
               _integer(retries, "retries", 0), _seconds(retry_delay, "retry_delay"),
               None if timeout is None else _seconds(timeout, "timeout", positive=True),
               bool(atomic), None if ttl is None else _seconds(ttl, "ttl"),
               None if concurrency is None else _integer(concurrency, "concurrency", 1),
               concurrency_key, _rate(rate))
    if concurrency_key is not None and (concurrency is None or not callable(concurrency_key)):
        raise TypeError("concurrency_key must be a function of the task's arguments, "
                        "given together with concurrency=N")

    def register(func):
        task_name = name or f"{_module_name(func)}.{func.__qualname__}"
        existing = _registry.get(task_name)
        if existing and not _same_function(existing.func, func):
            raise ValueError(f"task name {task_name!r} is already used by "
                             f"{existing.func.__module__}.{existing.func.__qualname__}; "
                             f"give one of them @task(name=...)")
        wrapper = TaskFunction(func, _name(task_name, "name"), *options)
        _registry[task_name] = wrapper
        return wrapper
    return register(func) if func is not None else register


def _rate(text):
    """"10/s", "600/m", "1000/h" -> (10, 1.0) ...; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*([smh])\s*", text) if isinstance(text, str) else None
    if not match or int(match[1]) < 1:
        raise ValueError(f"rate must look like '10/s', '600/m' or '1000/h' (at least 1), "
                         f"not {text!r}")
    return int(match[1]), {"s": 1.0, "m": 60.0, "h": 3600.0}[match[2]]


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


def on(event, fn=None):
    """Call `fn(job, **details)` on `event`; also a decorator, `@litetq.on("finished")`.

    "enqueued" (no details) in the producer, once the job is written; in the worker
    process that runs the step: "started" (`attempt`) as each attempt begins, then,
    once its outcome is committed, "retrying" (`error`, `delay`) or "finished"
    (`status`, `error` or None, `duration`: the last step's seconds). Hooks run in
    the process that registered them; one that raises is logged and changes nothing.
    """
    if event not in _hooks:
        raise ValueError(f"unknown hook event {event!r}; use one of {', '.join(_hooks)}")
    if fn is None:
        return lambda fn: on(event, fn)
    if not callable(fn):
        raise TypeError(f"a hook must be callable, not {type(fn).__name__} {_short_repr(fn)}")
    if fn not in _hooks[event]:  # a module imported twice registers its hooks once
        _hooks[event].append(fn)
    return fn


def _fire(event, job, **details):
    for fn in _hooks[event]:
        try:
            fn(job, **details)
        except Exception:
            logger.exception("the %r hook %s failed on job %s", event,
                             getattr(fn, "__qualname__", fn), job.id)


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
#
# One interface, two dialects. `Storage` holds every query and every decision
# about a job's state (what a step's outcome does to its row, when a waiting
# parent wakes, what a lease means), written once in the SQL that SQLite and
# PostgreSQL both speak: "?" placeholders, `litetq_now()` for the database's
# clock in epoch seconds, and "for update" clauses that lock rows where the
# database has row locks and are dropped where it has one writer. A dialect
# only says how to talk to its database: connecting, starting a write
# transaction, which errors mean "wait" or "try again", column types, many-row
# inserts, and how to hear that another process committed.

SCHEMA_VERSION = 3
SCHEMA = """
create table if not exists litetq_meta (key text primary key, value text not null);
create table if not exists litetq_jobs (
    id {serial},
    queue text not null,
    priority integer not null default 0,
    status text not null,
    name text not null,            -- task name of the current step
    args text not null,            -- codec JSON [args, kwargs] of the current step
    rest text,                     -- codec JSON list of calls a chain runs after this one
    due {real} not null,           -- not before this epoch time
    parked integer not null default 0,   -- why a queued step waits, see PARKED
    expires {real},                -- ttl: expire instead of running after this
    unique_key text,
    attempts integer not null default 0,
    steps integer not null default 1,
    lost integer not null default 0,     -- times a worker died holding the current step
    token integer not null default 0,    -- bumped by every claim: names the claim
    worker text,
    lease_until {real},
    started {real},
    cancel integer not null default 0,
    parent_id bigint,
    parent_token integer,          -- the parent's claim token when it spawned this job
    orphan integer not null default 0,   -- spawned by an attempt that did not succeed
    limit_key text,                -- what a concurrency limit counts this step against
    resume text,                   -- while waiting on subtasks: 'complete', or the JSON
                                   -- [name, args, rest, limit_key] of the next step
    result text,
    error text,
    traceback text,
    progress text,
    created {real} not null,
    finished {real}
);
create index if not exists litetq_jobs_ready on litetq_jobs (priority desc, due, id, queue)
    where status = 'queued' and parked = 0;
create index if not exists litetq_jobs_due on litetq_jobs (due, queue)
    where status = 'queued' and parked = 1;
create index if not exists litetq_jobs_held on litetq_jobs (
    limit_key, priority desc, due, id, queue) where status = 'queued' and parked = 2;
create index if not exists litetq_jobs_paused on litetq_jobs (queue, due)
    where status = 'queued' and parked = 3;
create index if not exists litetq_jobs_slots on litetq_jobs (limit_key)
    where status = 'running' and limit_key is not null;
create index if not exists litetq_jobs_finished on litetq_jobs (status, finished)
    where parent_id is null and finished is not null;
create index if not exists litetq_jobs_lease on litetq_jobs (lease_until)
    where status = 'running';
create index if not exists litetq_jobs_waiting on litetq_jobs (queue)
    where status = 'waiting';
create index if not exists litetq_jobs_parent on litetq_jobs (parent_id)
    where parent_id is not null;
create index if not exists litetq_jobs_queue on litetq_jobs (queue, status, id);
create unique index if not exists litetq_jobs_unique on litetq_jobs (unique_key)
    where unique_key is not null and status in ('queued', 'running', 'waiting');
create table if not exists litetq_logs (
    id {id}, job_id bigint not null, time {real} not null,
    level text not null, message text not null);
create index if not exists litetq_logs_job on litetq_logs (job_id);
create table if not exists litetq_messages (
    id {serial}, queue text not null, payload text not null,
    visible {real} not null, deliveries integer not null default 0);
create index if not exists litetq_messages_next on litetq_messages (queue, visible, id);
create table if not exists litetq_cron (
    name text primary key, spec text not null, task text not null, tz text, queue text,
    next_run {real} not null, last_run {real});
create table if not exists litetq_cron_fired (
    name text not null, fire_time {real} not null, job_id bigint not null,
    primary key (name, fire_time));
create table if not exists litetq_workers (
    id text primary key, host text not null, pid integer not null, queues text,
    concurrency integer, started {real} not null, heartbeat {real} not null);
create table if not exists litetq_limits (
    name text primary key, concurrency integer, rate integer, per {real});
create table if not exists litetq_starts (name text not null, time {real} not null);
create index if not exists litetq_starts_name on litetq_starts (name, time);
create table if not exists litetq_paused (queue text primary key);
create table if not exists litetq_counts (
    minute bigint not null,        -- epoch of the minute's start (0: minutes folded long ago)
    queue text not null, task text not null, outcome text not null, n bigint not null,
    primary key (minute, queue, task, outcome));
create table if not exists litetq_count_deltas (
    minute bigint not null, queue text not null, task text not null, outcome text not null);
create table if not exists litetq_removed (
    queue text not null, status text not null, n bigint not null, primary key (queue, status));
"""
# The indexes of queued steps end with `queue` (and `due`), so the jobs and oldest due
# time of each queue (stats, /metrics) are counted from the indexes alone.
# Why a queued step is not in the ready index, which claims read: 1 it is not due
# yet (it joins when due: promote), 2 a concurrency limit holds it (it joins when a
# step of its key stops running), 3 its queue is paused (it joins on resume). A
# claim parks what it cannot start, so no claim looks at a held step twice.
PARKED = {"due": 1, "limit": 2, "paused": 3}
# What a version-1 database (litetq 0.1) needs to become version 2.
MIGRATE_FROM_1 = """
alter table litetq_jobs add column parked integer not null default 0;
alter table litetq_jobs add column token integer not null default 0;
alter table litetq_jobs add column parent_token integer;
alter table litetq_jobs add column orphan integer not null default 0;
alter table litetq_jobs add column limit_key text;
drop index if exists litetq_jobs_next;
update litetq_jobs set parked = 1 where status = 'queued' and due > litetq_now();
"""
# What a version-2 database (and one just upgraded from 1) needs for version 3, besides
# the tables and indexes SCHEMA adds: the indexes of queued steps cover their queue.
MIGRATE_FROM_2 = """
drop index if exists litetq_jobs_ready;
drop index if exists litetq_jobs_due;
drop index if exists litetq_jobs_held;
drop index if exists litetq_jobs_paused;
"""

JOB_COLUMNS = ("id, queue, priority, status, name, args, rest, due, expires, unique_key, "
               "attempts, steps, lost, token, worker, lease_until, started, cancel, parent_id, "
               "resume, result, error, traceback, progress, created, finished")
CLAIM_COLUMNS = "id, name, args, rest, attempts, token, priority, due, expired, queue"
Claim = collections.namedtuple("Claim", CLAIM_COLUMNS)
UNFINISHED_SQL = "('queued', 'running', 'waiting')"
TREE = ("with recursive tree(id) as (select cast(? as bigint) union all select j.id from "
        "litetq_jobs j join tree on j.parent_id = tree.id) select id from tree")
TERMINAL_SQL = "('complete', 'failed', 'cancelled', 'expired')"

# Counting (version 3). Each step's outcome is counted in the transaction that commits
# it, per minute, queue, task and outcome (litetq_counts: the counter behind /metrics
# and the chart). Most steps end through _succeeded_alone() (complete, or a
# continuation), whose outcomes _count() adds up per transaction: a worker commits many
# steps in one, and a trigger's upsert for each would cost SQLite as much as the update
# it rides on. Every other outcome (retried, failed, cancelled, expired, and a parent's
# end when its subtasks are done) sets `resume` (to null, or a waiting parent's next
# step), which neither those updates nor claims do, and a trigger on it counts those.
# Every finished job was counted as it finished, so the finished jobs of a queue and
# status now are that count less those that left the status since (litetq_removed):
# only retry() (which resets `cancel` and `resume`, as anything that runs a finished
# job again must) and deletes do that, and two more triggers count them. Queued,
# running and waiting jobs are counted when asked, from partial indexes that hold only
# them. On PostgreSQL every worker would queue behind the row lock of the same hot
# row, so there one trigger counts every outcome by appending to litetq_count_deltas,
# which the supervisors fold into the counts (fold_counts) and readers add in. Minutes
# older than KEEP_MINUTES fold into minute 0, so the totals survive in a small table.
COUNTED = ("new.status in ('complete', 'failed', 'cancelled', 'expired') or new.status = "
           "'queued' and (new.steps > old.steps or old.status = 'running' and "
           "new.attempts = old.attempts)")
OUTCOME = ("case when new.status = 'queued' and new.steps > old.steps then 'continued' "
           "when new.status = 'queued' then 'retried' else new.status end")
COUNT_TRIGGER = ("after update of {columns} on litetq_jobs{each} "
                 f"when (old.status <> new.status and ({COUNTED}))")
RETRY_TRIGGER = ("after update of cancel, resume on litetq_jobs{each} when (old.status in "
                 f"{TERMINAL_SQL} and new.status <> old.status)")
REMOVED = ("insert into litetq_removed values (old.queue, old.status, 1) on conflict "
           "(queue, status) do update set n = litetq_removed.n + 1")
# An older database's finished jobs count as finished in minute 0.
COUNTS_FROM_JOBS = (f"insert into litetq_counts select 0, queue, name, status, count(*) "
                    f"from litetq_jobs where status in {TERMINAL_SQL} group by queue, name, "
                    f"status")
SQLITE_DDL = (
    "create trigger if not exists litetq_jobs_counted " +
    COUNT_TRIGGER.format(columns="resume", each="") +
    f" begin insert into litetq_counts values (litetq_minute(), new.queue, old.name, "
    f"{OUTCOME}, 1) on conflict (minute, queue, task, outcome) do update set n = n + 1; end",
    "create trigger if not exists litetq_jobs_retried " + RETRY_TRIGGER.format(each="") +
    f" begin {REMOVED}; end",
    "create trigger if not exists litetq_jobs_forgotten after delete on litetq_jobs "
    f"when old.status in {TERMINAL_SQL} begin {REMOVED}; end",
)
KEEP_MINUTES = 120  # minutes of step counts kept one by one; older ones fold into one total
WORKER_LIVE = 10.0  # seconds without a heartbeat before a worker no longer counts as live

NO_LIMIT = 2 ** 62  # "limit ?" for every row, in both dialects
STATUSES = UNFINISHED + TERMINAL
RETRYABLE = ("failed", "cancelled", "expired")
SEARCH_SPAN = 50_000  # ids one page of a search looks through, at most
BULK_BATCH = 500  # jobs retried or cancelled in one transaction
MERGE_MAX = 64  # queues find_jobs() merges one index range of each, at most
# The queue names, by skip scan of litetq_jobs_queue: one index seek per queue.
QUEUES_CTE = ("with recursive queues(name) as (select min(queue) from litetq_jobs union all "
              "select (select min(queue) from litetq_jobs where queue > queues.name) "
              "from queues where name is not null)")
QUEUE_NAMES = QUEUES_CTE + " select name from queues where name is not null"
# Unfinished jobs per queue and status: one count of litetq_jobs_queue's entries per
# queue and status, twice as fast as a "group by" over a big table (finished ones come
# from the step counts: see Storage.stats()).
UNFINISHED_STATS = (
    QUEUES_CTE + ", statuses(status) as (" + " union all ".join(
        f"select '{s}'" for s in UNFINISHED) + ") select name, status, (select count(*) from "
    "litetq_jobs j where j.queue = queues.name and j.status = statuses.status) from queues, "
    "statuses where name is not null")
# A job row from Queue._job_row is (queue, priority, name, args) for a plain call
# due now, which most jobs are: the short insert is half again as fast in bulk.
# With any option it goes on: (at, delay, parked, at, delay, ttl, rest, unique_key,
# parent_id, parent_token, limit_key), `at` and `delay` twice since due and expires
# need both.
INSERT_PLAIN = ("insert into litetq_jobs (queue, priority, name, args, due, created, status) "
                "values (?, ?, ?, ?, litetq_now(), litetq_now(), 'queued')")
INSERT_JOB = (
    "insert into litetq_jobs (queue, priority, name, args, due, parked, expires, rest, "
    "unique_key, parent_id, parent_token, limit_key, created, status) values (?, ?, ?, ?, "
    "coalesce(?, litetq_now() + ?), ?, coalesce(?, litetq_now() + ?) + ?, ?, ?, ?, ?, ?, "
    "litetq_now(), 'queued')")
INSERT_UNIQUE = (INSERT_JOB + " on conflict (unique_key) where unique_key is not null and "
                 f"status in {UNFINISHED_SQL} do nothing returning id")
PLAIN_FIELDS = 4
CLAIM_SET = ("status = 'running', worker = ?, token = token + 1, lease_until = litetq_now() + ?, "
             "attempts = attempts + 1, started = litetq_now()")
CLAIM_RETURNING = ("returning id, name, args, rest, attempts, token, priority, due, "
                   "expires < litetq_now(), queue")
READY = ("select id from litetq_jobs where status = 'queued' and parked = 0{where} "
         "order by priority desc, due, id limit ? for update skip locked")
CLAIM = (f"update litetq_jobs set {CLAIM_SET} where id in ({READY}) and not exists "
         "(select 1 from litetq_paused p where p.queue = litetq_jobs.queue) and not exists "
         f"(select 1 from litetq_limits l where l.name = litetq_jobs.name) {CLAIM_RETURNING}")
CLAIM_ONE = (f"update litetq_jobs set {CLAIM_SET}, limit_key = ? where id = ? "
             f"{CLAIM_RETURNING}")
CANDIDATES = ("select j.id, j.queue, j.name, j.limit_key, l.concurrency, l.rate, l.per, "
              "j.priority, j.due from litetq_jobs j left join litetq_limits l on l.name = "
              f"j.name where j.id in ({READY})")
LOCK_WAIT_SLICE = 0.002  # longest sleep between tries for a lock another connection holds
PROMOTE_EVERY = 0.05  # seconds between checks for delayed steps that came due, while busy
PARK_BATCH = 256  # rows one claim may park before it returns what it has
PURGE_BATCH = 500  # job trees deleted in one transaction
LIMITS_CHECK = 1.0  # seconds a process trusts its knowledge of whether limits are in use
CHANGE_COALESCE = 0.001  # wake-ups from other processes' commits at most this often
WAL_LIMIT = 16 * 2 ** 20  # bytes: past this the supervisor checkpoints and truncates the WAL
ATOMIC_SHARE = 0.8  # of the time, at most, back-to-back atomic steps hold SQLite's lock

_fork_generation = 0  # bumped in a forked child: inherited connections must not be used


def _after_fork():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)

# The connection an atomic step's transaction runs on, per storage, for the code
# inside that step (and only there: a context variable follows threads and tasks).
_held = contextvars.ContextVar("litetq_held", default={})


class _Rows(list):
    """A read's rows, with the two cursor methods callers use."""

    def fetchall(self):
        return self

    def fetchone(self):
        return self[0] if self else None


def _transaction(method):
    """A storage method whose body is one write transaction: `method(self, conn, ...)`.
    Inside an open transaction (an atomic step's) it runs as a savepoint of it."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return self.transact(lambda conn: method(self, conn, *args, **kwargs))
    return run


class Storage:
    """Every query litetq makes, and every decision about a job's state; the dialects
    below (`SQLiteStorage`, `PostgresStorage`) say how to talk to their database.

    Connections come from a small pool, so none outlives its use: a thread that
    touches a queue holds one only for the statement or transaction it runs.
    """

    memory = False  # one shared in-process database (SQLite's ":memory:")
    count_alone = False  # True: _count() counts what _succeeded_alone() finishes (COUNTED)
    driver_errors = ()  # the driver's exception classes, turned into litetq.Error
    max_connections = None  # in use at once, per process and storage (None: no limit)
    like = "like"  # a LIKE that ignores case (SQLite's does, for ASCII letters)

    def __init__(self, name, readonly=False, create=True):
        # create=False (and readonly): a database without litetq's tables is refused,
        # never given them, as admin commands want.
        self.name, self.readonly, self.create = name, readonly, create and not readonly
        self._idle = []  # pooled connections, none in use
        self._pool_lock = threading.Lock()
        self._generation = _fork_generation
        self._inherited = []  # a forked child's copies of the parent's: never used, never closed
        self._closed = False
        self._statements = {}  # shared SQL -> this dialect's text
        self._promote_at = 0.0  # monotonic time of the next check for delayed steps
        self._limits_checked, self._limits_used = -LIMITS_CHECK, False
        self._declared = {}  # task name -> the limits this process recorded for it
        self._changes = threading.Condition()  # see wait_for_change()
        self._change_count = 0
        self._waiting = 0
        self._watcher = None  # (fork generation, thread) hearing other processes' commits
        self._slots = None  # a semaphore of max_connections
        self._watched = {}  # job id -> callbacks of waiters for it to finish
        self._look = threading.Event()  # wakes _look_at_jobs
        self._local = threading.local()  # .ended: what _end() ended in this thread's transaction

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"

    # What a dialect provides.

    def _connect(self):
        raise NotImplementedError

    def _translate(self, sql):
        return sql

    def _begin(self, conn):
        conn.execute("begin")

    def _execute(self, conn, sql, params=()):
        return conn.execute(self._sql(sql), params)

    def _retryable(self, exc):
        """True if a transaction that raised `exc` may simply run again."""
        return False

    def _error(self, exc):
        return Error(f"{self.name}: {exc}")

    def _insert_many(self, conn, sql, rows):
        return [self._execute(conn, sql + " returning id", row).fetchone()[0] for row in rows]

    def _adopt(self, conn):
        """The caller's own connection, checked, and made ready for litetq's statements."""
        return conn

    def _watch(self):
        """Run in a thread: call self._heard() whenever another process commits."""

    def maintain(self):
        """Called by every worker's supervisor several times a second."""

    def clock(self):
        """The database's time, in epoch seconds."""
        return self.query_one("select litetq_now()")[0]

    # Connections and transactions.

    def _sql(self, sql):
        try:
            return self._statements[sql]
        except KeyError:
            text = self._statements[sql] = self._translate(sql)
            return text

    def _acquire(self):
        if self._generation != _fork_generation:  # forked: the parent's connections are its own
            self._inherited.extend(self._idle)
            self._idle, self._generation = [], _fork_generation
            self._slots = None
        if self.max_connections:
            if self._slots is None:
                self._slots = threading.BoundedSemaphore(self.max_connections)
            if not self._slots.acquire(timeout=BUSY_TIMEOUT):
                raise Error(f"{self.name}: all {self.max_connections} connections of this "
                            f"process stayed in use for {BUSY_TIMEOUT:g} s")
        try:
            with self._pool_lock:
                if self._idle:
                    return self._idle.pop()
            if self._closed:
                raise Error(f"{self.name}: the queue is closed")
            return self._connect()
        except BaseException:
            self._return_slot()
            raise

    def _release(self, conn, reuse):
        self._return_slot()
        if reuse and self._generation == _fork_generation and not self._closed:
            with self._pool_lock:
                if len(self._idle) < POOL_SIZE:
                    self._idle.append(conn)
                    return
        with contextlib.suppress(Exception):
            conn.close()
        if not reuse:  # the database went away: the idle ones are as stale
            with self._pool_lock:
                idle, self._idle = self._idle, []
            for each in idle:
                with contextlib.suppress(Exception):
                    each.close()

    def _return_slot(self):
        if self._slots is not None and self._generation == _fork_generation:
            with contextlib.suppress(ValueError):
                self._slots.release()

    def _reusable(self, conn):
        return True

    @contextlib.contextmanager
    def connection(self):
        """A connection for a few statements: the one of this context's open atomic
        step if there is one, else one from the pool. Driver errors leave as Error."""
        held = _held.get().get(self)
        conn = held if held is not None else self._acquire()
        reuse = False
        try:
            yield conn
            reuse = True
        except self.driver_errors as exc:
            reuse = held is None and self._reusable(conn)
            raise self._error(exc) from exc
        except BaseException:
            reuse = held is None and self._reusable(conn)
            raise
        finally:
            if held is None:
                self._release(conn, reuse)

    def transact(self, work):
        """Run `work(conn)` in one write transaction and return what it returns; inside
        an open transaction, as a savepoint of it. A dialect may have it run again."""
        with self.connection() as conn:
            if self._in_transaction(conn):
                self._execute(conn, "savepoint litetq")
                try:
                    result = work(conn)
                except BaseException:
                    self._execute(conn, "rollback to litetq")
                    raise
                finally:
                    self._execute(conn, "release litetq")
                return result
            while True:
                self._local.ended = []
                self._begin(conn)
                try:
                    result = work(conn)
                    conn.commit()
                    return result
                except BaseException as exc:
                    self._local.ended = []
                    with contextlib.suppress(Exception):
                        conn.rollback()
                    if not self._retryable(exc):
                        raise

    def _in_transaction(self, conn):
        return conn.in_transaction

    def begin_step(self):
        """Open an atomic step's transaction on a connection of its own, and return it
        (see hold())."""
        conn = self._acquire()
        self._local.ended = []
        try:
            self._begin(conn)
        except self.driver_errors as exc:
            self._release(conn, self._reusable(conn))
            raise self._error(exc) from exc
        except BaseException:
            self._release(conn, self._reusable(conn))
            raise
        return conn

    def hold(self, conn):
        """Until unhold(), what this context (thread or asyncio task) does with this
        storage runs on `conn`, in the atomic step's transaction. Returns a token."""
        return _held.set({**_held.get(), self: conn})

    @staticmethod
    def unhold(token):
        _held.reset(token)

    def end_step(self, conn, commit):
        """Commit or roll back an atomic step's transaction and give its connection back.
        A failed commit rolls back and raises Error."""
        reuse = True
        try:
            if self._in_transaction(conn):  # unless the task ended it itself
                conn.commit() if commit else conn.rollback()
        except self.driver_errors as exc:
            with contextlib.suppress(Exception):
                conn.rollback()
            reuse = self._reusable(conn)
            raise self._error(exc) from exc
        finally:
            self._release(conn, reuse)

    def query(self, sql, params=()):
        return self._read(sql, params).fetchall()

    def query_one(self, sql, params=()):
        return self._read(sql, params).fetchone()

    def _read(self, sql, params):
        """A cursor on a read, tried once more on a new connection if the one it had
        was dropped (a server restart closes every pooled connection)."""
        for attempt in (1, 2):
            try:
                with self.connection() as conn:
                    cursor = self._execute(conn, sql, params)
                    return _Rows(cursor.fetchall())
            except _Unreachable:
                if attempt == 2 or _held.get().get(self) is not None:
                    raise

    def change(self, sql, params=()):
        """One statement that writes, in a transaction of its own; returns its cursor's
        rows when it has RETURNING, else the number of rows changed."""
        with self.connection() as conn:
            cursor = self._execute(conn, sql, params)
            return cursor.fetchall() if cursor.description else cursor.rowcount

    def close(self):
        self._closed = True
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
        with self._changes:
            self._changes.notify_all()

    # Hearing about commits. One thread per process and storage (the watcher) hears
    # every commit, this process's own included: the dialect's _watch() calls
    # _heard() for each. Waiters wait on a condition it notifies; those waiting for a
    # job to finish are checked all together by one query per change, so a thousand
    # waiters cost what one does. ":memory:" has no watcher: its commits call
    # changed() themselves.

    def changed(self):
        """Wake this process's waiters: the database may have changed."""
        if self._waiting:
            with self._changes:
                self._change_count += 1
                self._changes.notify_all()

    @property
    def changes(self):
        """A number that moves on whenever the database may have changed."""
        return self._change_count

    def wait_for_change(self, seen, timeout):
        """Block until `changes` differs from `seen`, or `timeout` seconds pass."""
        self._start_watcher()
        with self._changes:
            if self._change_count == seen and not self._closed:
                self._waiting += 1
                try:
                    self._changes.wait(timeout)
                finally:
                    self._waiting -= 1
            return self._change_count

    def watch_job(self, job_id, callback):
        """Call `callback()` once, from a thread of litetq's, when the job is finished
        (or gone). One query looks at every watched job, after each change and once a
        second: ten thousand waiters cost what one does."""
        self._start_watcher()
        with self._pool_lock:
            self._watched.setdefault(job_id, []).append(callback)
        self._look.set()

    def unwatch_job(self, job_id, callback):
        with self._pool_lock:
            callbacks = self._watched.get(job_id, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._watched.pop(job_id, None)

    def _start_watcher(self):
        if self.memory or (self._watcher and self._watcher[0] == _fork_generation):
            return
        with self._pool_lock:
            if self._watcher and self._watcher[0] == _fork_generation:
                return
            threads = [threading.Thread(target=target, daemon=True, name=name) for target, name
                       in ((self._watch_guarded, "litetq-watch"), (self._look_at_jobs,
                                                                   "litetq-jobs"))]
            self._watcher = (_fork_generation, threads)
        for thread in threads:
            thread.start()

    def _watch_guarded(self):
        while not self._closed:
            try:
                self._watch()
            except Exception as exc:  # the database is away: waiters fall back to polling
                if self._closed:  # closed meanwhile (its server may be gone too): no news
                    return
                logger.warning("%s: cannot listen for changes (%s); retrying", self.name, exc)
                self._heard()
                time.sleep(1.0)

    def _heard(self):
        """A commit happened: wake the waiters, and have the watched jobs looked at."""
        with self._changes:
            self._change_count += 1
            self._changes.notify_all()
        if self._watched:
            self._look.set()

    def _look_at_jobs(self):
        """The thread behind watch_job(): when told, or each second, one query per 500
        watched jobs finds those finished or gone, and calls their callbacks."""
        while not self._closed:
            self._look.wait(1.0)
            self._look.clear()
            with self._pool_lock:
                ids = list(self._watched)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                try:
                    rows = self.query(f"select id, status in {TERMINAL_SQL} from litetq_jobs "
                                      f"where id in ({', '.join('?' * len(chunk))})", chunk)
                except Error:  # the database is away: the next look will tell
                    break
                pending = {job_id for job_id, done in rows if not done}
                with self._pool_lock:
                    callbacks = [callback for job_id in chunk if job_id not in pending
                                 for callback in self._watched.pop(job_id, ())]
                for callback in callbacks:
                    try:
                        callback()
                    except Exception:  # one waiter's must not stop the thread all share
                        logger.exception("%s: a job waiter failed", self.name)
            time.sleep(CHANGE_COALESCE)

    # Enqueueing.

    def insert_jobs(self, rows, conn=None):
        """Insert job rows (see INSERT_JOB); return their ids. Through `conn`, the
        caller's own open connection, nothing is committed."""
        if conn is not None:
            return self._insert(self._adopt(conn), rows)
        if len(rows) == 1 and len(rows[0]) == PLAIN_FIELDS:  # one statement: atomic alone
            with self.connection() as conn:
                return self._insert_many(conn, INSERT_PLAIN, rows)
        return self.transact(lambda conn: self._insert(conn, rows))

    def _insert(self, conn, rows):
        if all(len(row) == PLAIN_FIELDS for row in rows):
            return self._insert_many(conn, INSERT_PLAIN, rows)
        full = [row if len(row) > PLAIN_FIELDS else row + (None, 0, 0, None, 0, None, None,
                                                           None, None, None, None) for row in rows]
        if not any(row[11] is not None for row in full):
            return self._insert_many(conn, INSERT_JOB, full)
        return [self._insert_unique(conn, row) for row in full]

    def _insert_unique(self, conn, row):
        if row[11] is None:
            return self._insert_many(conn, INSERT_JOB, [row])[0]
        found = self._execute(conn, INSERT_UNIQUE, row).fetchone()
        if found is None:  # an unfinished job holds the key: that one is the answer
            found = self._execute(conn, "select id from litetq_jobs where unique_key = ? and "
                                  f"status in {UNFINISHED_SQL}", (row[11],)).fetchone()
        return found[0]

    # Claiming steps.

    def claim(self, worker, lease, queues=None, limit=1, expired=None):
        """Take up to `limit` due steps, in queue order: a list of `Claim`s. Steps
        whose ttl ran out are marked expired instead (their ids go to the list
        `expired`, if given).

        The claim is one UPDATE over the ready index: SQLite's write statement takes
        the lock before it reads, PostgreSQL's "skip locked" passes rows another
        worker is taking, so no step is ever claimed twice. It passes over steps of
        limited tasks and paused queues; when such are in use, _claim_held() takes or
        parks those, in a transaction where the limits are counted exactly."""
        self.promote()
        while True:  # until a claim holds a step that has not expired, or none is due
            rows = self.change(CLAIM.format(where=self._queue_filter(queues)),
                               (worker, lease, *(queues or ()), limit))
            if len(rows) < limit and self._limits_in_use():
                rows += self.transact(lambda conn: self._claim_held(
                    conn, worker, lease, queues, limit - len(rows)))
            claims = sorted(map(Claim._make, rows),  # RETURNING has no order
                            key=lambda claim: (-claim.priority, claim.due, claim.id))
            ended = [claim for claim in claims if claim.expired]
            if ended:
                self._expire(ended)
                if expired is not None:
                    expired.extend(claim.id for claim in ended)
            live = [claim for claim in claims if not claim.expired]
            if live or not claims:
                return live

    @_transaction
    def _expire(self, conn, claims):
        for claim in claims:  # never begun: the claim was no attempt
            self._execute(conn, "update litetq_jobs set attempts = attempts - 1 where id = ?",
                          (claim.id,))
            key = self._execute(conn, "select limit_key from litetq_jobs where id = ?",
                                (claim.id,)).fetchone()[0]
            self._free_slot(conn, key)
            self._end(conn, claim.id, "expired", only_if="running",
                      error="expired: waited longer than its ttl")

    def _limits_in_use(self):
        """Whether any task has a limit or any queue is paused; looked up once a second.
        (The claim's own conditions are exact: this only saves the slower path.)"""
        now = time.monotonic()
        if now >= self._limits_checked + LIMITS_CHECK:
            self._limits_used = bool(self.query_one(
                "select exists (select 1 from litetq_limits) or exists (select 1 from "
                "litetq_paused)")[0])
            self._limits_checked = now
        return self._limits_used

    def _claim_held(self, conn, worker, lease, queues, limit):
        """Take or park each candidate in queue order: a step of a paused queue, or one
        a limit holds, leaves the ready index (see PARKED); the rest are claimed.
        Limits are counted under a lock per key, so claims on every host agree."""
        paused = {queue for (queue,) in self._execute(conn, "select queue from litetq_paused")}
        now = self._execute(conn, "select litetq_now()").fetchone()[0]
        slots, starts, claimed, budget = {}, {}, [], PARK_BATCH
        while len(claimed) < limit and budget > 0:
            asked = min(limit - len(claimed), budget)
            rows = self._execute(conn, CANDIDATES.format(where=self._queue_filter(queues)),
                                 (*(queues or ()), asked)).fetchall()
            for job_id, queue, name, key, concurrency, rate, per, _, _ in sorted(
                    rows, key=lambda row: (-row[7], row[8], row[0])):
                key = (key or name) if concurrency is not None else None
                if queue in paused:
                    self._execute(conn, "update litetq_jobs set parked = 3 where id = ?",
                                  (job_id,))
                elif key is not None and not self._take_slot(conn, key, concurrency, slots):
                    self._execute(conn, "update litetq_jobs set parked = 2, limit_key = ? "
                                  "where id = ?", (key, job_id))
                elif rate is not None and (wait := self._rate_wait(conn, name, rate, per, now,
                                                                   starts)):
                    self._execute(conn, "update litetq_jobs set parked = 1, due = ? "
                                  "where id = ?", (now + wait, job_id))
                else:
                    claimed += self._execute(conn, CLAIM_ONE, (worker, lease, key, job_id))
                    if rate is not None:
                        self._execute(conn, "insert into litetq_starts values "
                                      "(?, litetq_now())", (name,))
            budget -= len(rows)
            if len(rows) < asked:
                break
        return claimed

    def _take_slot(self, conn, key, concurrency, slots):
        """True if a step of limit `key` may start now (and count it as started)."""
        if key not in slots:
            self._lock_key(conn, key)
            running = self._execute(conn, "select count(*) from litetq_jobs where "
                                    "status = 'running' and limit_key = ?", (key,)).fetchone()[0]
            slots[key] = concurrency - running
        slots[key] -= 1
        return slots[key] >= 0

    def _rate_wait(self, conn, name, rate, per, now, starts):
        """0 if a step of `name` may start now under its rate (and count its start),
        else the seconds until its window has room."""
        if name not in starts:
            self._lock_key(conn, f"rate {name}")
            self._execute(conn, "delete from litetq_starts where name = ? and time <= ?",
                          (name, now - per))
            starts[name] = [time for (time,) in self._execute(
                conn, "select time from litetq_starts where name = ? order by time", (name,))]
        times = starts[name]
        if len(times) < rate:
            times.append(now)
            return 0
        return max(times[len(times) - rate] + per - now, 0.001)

    def _lock_key(self, conn, key):
        """Inside a transaction: one claim at a time counts the steps of `key`."""

    def _free_slot(self, conn, key):
        """A step of limit `key` stopped running: the first step it held joins the
        ready ones again (the next claim takes it, or parks it again)."""
        if key is not None:
            self._execute(conn, "update litetq_jobs set parked = 0 where id in (select id "
                          "from litetq_jobs where status = 'queued' and parked = 2 and "
                          "limit_key = ? order by priority desc, due, id limit 1)", (key,))

    @staticmethod
    def _queue_filter(queues, column="queue"):
        return f" and {column} in ({', '.join('?' * len(queues))})" if queues else ""

    def next_work(self, queues=None):
        """Seconds until a step of `queues` is due: 0.0 if one is, None if none is
        queued. Reads only, unless delayed steps came due (see promote)."""
        self.promote(force=True)
        where, params = self._queue_filter(queues), tuple(queues or ())
        with self.connection() as conn:
            if self._execute(conn, "select 1 from litetq_jobs where status = 'queued' and "
                             f"parked = 0{where} limit 1", params).fetchone():
                return 0.0
            wait = self._execute(conn, "select min(due) - litetq_now() from litetq_jobs "
                                 f"where status = 'queued' and parked = 1{where}",
                                 params).fetchone()[0]
        return None if wait is None else max(wait, 0.0)

    def promote(self, force=False):
        """Delayed steps whose time came join the ready ones. They wait in an index of
        their own, so a backlog of them costs a claim nothing; while busy, a worker
        looks for those that came due every PROMOTE_EVERY seconds."""
        if not force and time.monotonic() < self._promote_at:
            return
        with self.connection() as conn:
            wait = self._execute(conn, "select min(due) - litetq_now() from litetq_jobs "
                                 "where status = 'queued' and parked = 1").fetchone()[0]
            if wait is not None and wait <= 0:
                self._execute(conn, "update litetq_jobs set parked = 0 where status = "
                              "'queued' and parked = 1 and due <= litetq_now()")
                wait = None
        self._promote_at = time.monotonic() + min(PROMOTE_EVERY, max(wait or 0.0, 0.0))

    def renew_leases(self, claims, lease):
        """Extend the leases of the (job id, token) claims this process holds."""
        def renew(conn):
            for job_id, token in claims:
                self._execute(conn, "update litetq_jobs set lease_until = litetq_now() + ? "
                              "where id = ? and token = ? and status = 'running'",
                              (lease, job_id, token))
        self.transact(renew)

    # Finishing steps.

    def step_succeeded(self, job_id, token, step, result=None, call=None):
        """Record a finished step, `step` its (queue, task name): its `result` JSON, or
        the continuation `call` (name, args JSON, rest JSON). Returns the job's new
        status, or None if the claim was lost meanwhile (another worker owns the step)."""
        if self.count_alone:
            return self.finish_steps([(job_id, token, step, result, call)])[0]
        with self.connection() as conn:  # one statement, which its trigger counts
            if self._succeeded_alone(conn, job_id, token, result, call):
                return "complete" if call is None else "queued"
        return self.transact(lambda conn: self._succeed(conn, job_id, token, result, call))

    def finish_steps(self, outcomes):
        """Record many successes, each (job id, token, (queue, task name), result,
        call), in one transaction; returns their statuses as step_succeeded() would."""
        def finish(conn):
            statuses, counted = [], collections.Counter()
            for job_id, token, (queue, name), result, call in outcomes:
                if self._succeeded_alone(conn, job_id, token, result, call):
                    counted[queue, name, "complete" if call is None else "continued"] += 1
                    statuses.append("complete" if call is None else "queued")
                else:
                    statuses.append(self._succeed(conn, job_id, token, result, call))
            if self.count_alone and counted:
                self._count(conn, counted)
            return statuses
        return self.transact(finish)

    def _count(self, conn, counted):
        """Count the steps _succeeded_alone() finished, in the same transaction: one
        upsert per queue, task and outcome, however many steps (see COUNTED)."""
        for (queue, name, outcome), n in counted.items():
            self._execute(conn, "insert into litetq_counts values (litetq_minute(), ?, ?, ?, ?) "
                          "on conflict (minute, queue, task, outcome) do update set "
                          "n = litetq_counts.n + excluded.n", (queue, name, outcome, n))

    def _succeeded_alone(self, conn, job_id, token, result, call):
        """The common case in one statement: no cancel flag, no subtasks of this step,
        and (to complete) no parent to tell. False sends the caller the long way."""
        claimed = ("id = ? and token = ? and status = 'running' and cancel = 0 and "
                   "limit_key is null and not "
                   "exists (select 1 from litetq_jobs c where c.parent_id = ? and "
                   f"c.orphan = 0 and (c.status in {UNFINISHED_SQL} or c.parent_token = ?))")
        if call is None:
            sql = ("update litetq_jobs set status = 'complete', result = ?, "
                   "finished = litetq_now(), error = null, traceback = null, "
                   f"lease_until = null where {claimed} and parent_id is null")
            params = (result, job_id, token, job_id, token)
        else:
            sql = ("update litetq_jobs set status = 'queued', name = ?, args = ?, rest = ?, "
                   "limit_key = ?, steps = steps + 1, attempts = 0, lost = 0, error = null, "
                   "expires = null, "
                   f"due = litetq_now(), parked = 0, lease_until = null where {claimed}")
            params = (*call, job_id, token, job_id, token)
        return self._execute(conn, sql, params).rowcount == 1

    def _succeed(self, conn, job_id, token, result, call):
        held, _ = self._held(conn, job_id, token)
        if held != "running":
            return held
        # The continuation waits in `resume` until the subtasks finish: should one fail
        # and the job be retried, it is this step that runs again, with new subtasks.
        resume = "complete" if call is None else json.dumps(call)
        self._execute(conn, "update litetq_jobs set status = 'waiting', resume = ?, result = ?, "
                      "lease_until = null where id = ?", (resume, result, job_id))
        self._settle(conn, job_id)
        return self._execute(conn, "select status from litetq_jobs where id = ?",
                             (job_id,)).fetchone()[0]

    @_transaction
    def step_failed(self, conn, job_id, token, error, tb, retry_delay=None):
        """Record a failed attempt: queued again after `retry_delay` seconds, or (None)
        failed for good. Returns the new status, or None if the claim was lost."""
        error, tb = _clean_text(error), tb and _clean_text(tb)
        held, _ = self._held(conn, job_id, token, error, tb)
        if held != "running":
            return held
        self._abandon(conn, job_id, token)
        if retry_delay is None:
            self._end(conn, job_id, "failed", error=error, tb=tb)
            return "failed"
        self._execute(conn, "update litetq_jobs set status = 'queued', "
                      "due = litetq_now() + ?, parked = ?, error = ?, traceback = ?, "
                      "lease_until = null, expires = null, resume = null where id = ?",
                      (retry_delay, int(retry_delay > 0), error, tb, job_id))
        return "queued"

    def _held(self, conn, job_id, token, error=None, tb=None):
        """Before a step's end is recorded: ("running", lost count) while this claim
        still holds it; (None, None) if the claim was lost; ("cancelled", None) if the
        job was cancelled meanwhile, which ends it here. Whatever comes next, the step
        stops running in this transaction: its concurrency slot is free."""
        row = self._execute(conn, "select lost, cancel, limit_key from litetq_jobs where "
                            "id = ? and token = ? and status = 'running' for update",
                            (job_id, token)).fetchone()
        if row is None:
            return None, None
        self._free_slot(conn, row[2])
        if row[1]:
            self._end(conn, job_id, "cancelled", error=error, tb=tb)
            return "cancelled", None
        return "running", row[0]

    def _abandon(self, conn, job_id, token):
        """The subtasks spawned by an attempt that did not succeed are orphans: they
        no longer count as the job's children, and those unfinished are cancelled."""
        orphans = self._execute(conn, "update litetq_jobs set orphan = 1 where parent_id = ? "
                                "and parent_token = ? and orphan = 0 returning id",
                                (job_id, token)).fetchall()
        for (orphan,) in orphans:
            self._cancel_tree(conn, orphan)

    def reap(self):
        """Queue again the steps whose worker stopped renewing its lease."""
        lapsed = self.query("select id, token from litetq_jobs where status = 'running' "
                            "and lease_until < litetq_now()")
        for job_id, token in lapsed:
            self.lose(job_id, token, "worker lost: its lease lapsed")
        return len(lapsed)

    @_transaction
    def lose(self, conn, job_id, token, message):
        """A step whose worker died: queued again, not counted as an attempt (or
        cancelled, if that was asked); the MAX_LOST-th loss fails it as "worker lost"."""
        held, lost = self._held(conn, job_id, token)
        if held != "running":
            return held
        self._abandon(conn, job_id, token)
        if lost + 1 >= MAX_LOST:
            self._end(conn, job_id, "failed", error=f"worker lost: its worker died "
                      f"{MAX_LOST} times (the last time: {message})")
            return "failed"
        self._execute(conn, "update litetq_jobs set status = 'queued', due = litetq_now(), "
                      "parked = 0, error = ?, attempts = attempts - 1, lost = lost + 1, "
                      "lease_until = null where id = ?", (message, job_id))
        return "queued"

    def _end(self, conn, job_id, status, error=None, tb=None, only_if=None):
        """Make a job terminal, then let its parent know."""
        sql = ("update litetq_jobs set status = ?, finished = litetq_now(), "
               "error = coalesce(?, error), traceback = coalesce(?, traceback), "
               "lease_until = null, resume = null where id = ?")
        params = [status, error, tb, job_id]
        if only_if:
            sql += " and status = ?"
            params.append(only_if)
        row = self._execute(conn, sql + " returning parent_id", params).fetchone()
        if row is None:
            return
        self._local.__dict__.setdefault("ended", []).append((job_id, status, error))
        if status != "complete":
            self._cancel_tree(conn, job_id, include_self=False)
        if row[0] is not None:
            self._settle(conn, row[0])

    def _settle(self, conn, job_id):
        """A waiting job whose subtasks are all terminal resumes, completes or fails.
        The job's row is locked first, so of two subtasks ending at once on PostgreSQL
        the second to commit always sees the first finished."""
        row = self._execute(conn, "select status, resume from litetq_jobs where id = ? "
                            "for update", (job_id,)).fetchone()
        if row is None or row[0] != "waiting":
            return
        children = "from litetq_jobs where parent_id = ? and orphan = 0"
        if self._execute(conn, f"select 1 {children} and status in {UNFINISHED_SQL} limit 1",
                         (job_id,)).fetchone():
            return
        bad = self._execute(conn, f"select id, name, status, error {children} and "
                            "status != 'complete' order by id limit 1", (job_id,)).fetchone()
        if bad:
            child, name, status, error = bad
            detail = f": {error}" if status == "failed" else f" ({status})"
            self._end(conn, job_id, "failed", error=f"subtask {child} ({name}) {status}{detail}")
        elif row[1] != "complete":  # the continuation: the job's next step
            self._execute(conn, "update litetq_jobs set status = 'queued', name = ?, args = ?, "
                          "rest = ?, limit_key = ?, steps = steps + 1, attempts = 0, lost = 0, "
                          "error = null, expires = null, due = litetq_now(), parked = 0, "
                          "resume = null where id = ?", (*json.loads(row[1]), job_id))
        else:
            self._execute(conn, "update litetq_jobs set error = null, traceback = null "
                          "where id = ?", (job_id,))
            self._end(conn, job_id, "complete")

    def _cancel_tree(self, conn, job_id, include_self=True):
        """Cancel a job (if asked) and its unfinished descendants; flag running ones."""
        ids = [row[0] for row in self._execute(conn, TREE, (job_id,))]
        if not include_self:
            ids = ids[1:]
        changed = False
        for each in ids:
            # Locked first: a step ending meanwhile (running to waiting, say) commits
            # before we look, or after we are done; never between our two updates.
            row = self._execute(conn, "select status, cancel from litetq_jobs where id = ? "
                                "for update", (each,)).fetchone()
            if row is None:
                continue
            if row[0] in ("queued", "waiting"):
                self._execute(conn, "update litetq_jobs set status = 'cancelled', finished = "
                              "litetq_now(), resume = null where id = ?", (each,))
                changed = True
            elif row[0] == "running" and not row[1]:
                self._execute(conn, "update litetq_jobs set cancel = 1 where id = ?", (each,))
                changed = True
        return changed

    @_transaction
    def cancel(self, conn, job_id):
        return self._cancel(conn, job_id)

    def _cancel(self, conn, job_id):
        parent = self._execute(conn, "select parent_id from litetq_jobs where id = ?",
                               (job_id,)).fetchone()
        if parent is None:
            raise NotFound(f"no job {job_id} in {self.name}")
        changed = self._cancel_tree(conn, job_id)
        if changed and parent[0] is not None:
            self._settle(conn, parent[0])
        return changed

    @_transaction
    def retry(self, conn, job_id):
        return self._retry(conn, job_id)

    def _retry(self, conn, job_id):
        row = self._execute(conn, "select unique_key, token from litetq_jobs where id = ? and "
                            "status in ('failed', 'cancelled', 'expired') for update",
                            (job_id,)).fetchone()
        if row is None:
            if not self._execute(conn, "select 1 from litetq_jobs where id = ?",
                                 (job_id,)).fetchone():
                raise NotFound(f"no job {job_id} in {self.name}")
            return False
        key, token = row
        holder = key is not None and self._execute(
            conn, f"select id from litetq_jobs where unique_key = ? and status in "
            f"{UNFINISHED_SQL}", (key,)).fetchone()
        if holder:
            raise Error(f"job {job_id} cannot run again while job {holder[0]} holds "
                        f"its unique key {key!r}")
        self._abandon(conn, job_id, token)  # its last attempt's subtasks start afresh too
        self._execute(conn, "update litetq_jobs set status = 'queued', due = litetq_now(), "
                      "parked = 0, attempts = 0, lost = 0, cancel = 0, expires = null, "
                      "error = null, traceback = null, finished = null, resume = null "
                      "where id = ?", (job_id,))
        return True

    @_transaction
    def requeue(self, conn, job_id, token):
        """Give a step back without counting the attempt (a worker shutting down)."""
        return self._give_back(conn, "id = ? and token = ?", (job_id, token))

    @_transaction
    def release(self, conn, worker):
        """Give back, uncounted, the steps a stopped worker process still held."""
        return self._give_back(conn, "worker = ?", (worker,))

    def _give_back(self, conn, where, params):
        """Queue again, uncounted, the running steps matching `where`; those whose job
        was cancelled meanwhile end as cancelled instead of running again."""
        steps = self._execute(conn, f"select id, token, cancel, limit_key from litetq_jobs "
                              f"where {where} and status = 'running' for update",
                              params).fetchall()
        for job_id, token, cancel, key in steps:
            self._free_slot(conn, key)
            if cancel:
                self._end(conn, job_id, "cancelled")
                continue
            self._abandon(conn, job_id, token)
            self._execute(conn, "update litetq_jobs set status = 'queued', parked = 0, "
                          "lease_until = null, attempts = attempts - 1 where id = ?", (job_id,))
        return len(steps)

    def has_work(self, queues, workers):
        """True if a step is due in `queues` or claimed (begun or not) by one of the
        `workers`: one statement, so a step that finishes and queues its continuation
        between two reads cannot hide."""
        due = ("status = 'queued' and (parked = 0 or parked = 1 and due <= litetq_now())"
               + self._queue_filter(queues))
        claimed = f"status = 'running' and worker in ({', '.join('?' * len(workers))})"
        return bool(self.query_one(
            f"select exists (select 1 from litetq_jobs where {due}) "
            f"or exists (select 1 from litetq_jobs where {claimed})",
            (*(queues or ()), *workers))[0])

    # Reading jobs.

    def job(self, job_id):
        row = self.query_one(f"select {JOB_COLUMNS} from litetq_jobs where id = ?", (job_id,))
        if row is None:
            raise NotFound(f"no job {job_id} in {self.name}")
        return dict(zip(JOB_COLUMNS.split(", "), row))

    def job_field(self, job_id, column):
        row = self.query_one(f"select {column} from litetq_jobs where id = ?", (job_id,))
        if row is None:
            raise NotFound(f"no job {job_id} in {self.name}")
        return row[0]

    def jobs(self, status=None, queue=None, name=None, limit=100):
        clauses, params = [], []
        for column, value in (("status", status), ("queue", queue), ("name", name)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"where {' and '.join(clauses)}" if clauses else ""
        return [row[0] for row in self.query(
            f"select id from litetq_jobs {where} order by id desc limit ?",
            (*params, NO_LIMIT if limit is None else limit))]

    def children(self, job_id):
        """The subtasks that count: spawned by attempts that succeeded or still run.
        NotFound if the job is gone."""
        ids = [row[0] for row in self.query(
            "select id from litetq_jobs where parent_id = ? and orphan = 0 order by id",
            (job_id,))]
        if not ids:
            self.job_field(job_id, "id")
        return ids

    def stats(self):
        """{queue: {status: count}}: unfinished jobs counted through litetq_jobs_queue,
        finished ones from the step counts (see COUNTED)."""
        counts = {}
        for queue, status, n in self.query(
                f"{UNFINISHED_STATS} union all select queue, outcome, n from litetq_counts "
                f"where outcome in {TERMINAL_SQL} union all select queue, outcome, 1 from "
                f"litetq_count_deltas where outcome in {TERMINAL_SQL} union all select queue, "
                f"status, -n from litetq_removed"):
            by_status = counts.setdefault(queue, {})
            by_status[status] = by_status.get(status, 0) + n
        return {queue: {status: n for status, n in by_status.items() if n}
                for queue, by_status in counts.items() if any(by_status.values())}

    def oldest_due(self):
        """{queue: seconds its oldest due, queued job has waited}, from the indexes of
        queued jobs (with the time read once: litetq_now() per row would cost more)."""
        with self.connection() as conn:
            now = self._execute(conn, "select litetq_now()").fetchone()[0]
            rows = self._execute(conn, " union all ".join(
                f"select queue, min(due) from litetq_jobs where status = 'queued' and "
                f"parked = {parked} and due <= ? group by queue"
                for parked in (0, *PARKED.values())), (now,) * (1 + len(PARKED))).fetchall()
        oldest = {}
        for queue, due in rows:
            oldest[queue] = max(oldest.get(queue, 0.0), now - due)
        return oldest

    def step_counts(self):
        """(queue, task, outcome, steps) of every step ever finished, for /metrics."""
        return self.query(
            "select queue, task, outcome, sum(n) from (select queue, task, outcome, n from "
            "litetq_counts union all select queue, task, outcome, 1 from litetq_count_deltas"
            ") c group by queue, task, outcome order by queue, task, outcome")

    def steps_per_minute(self, minutes):
        """(epoch of the current minute, [(minute, outcome, steps)]) for the last
        `minutes` minutes."""
        with self.connection() as conn:
            now = self._execute(conn, "select litetq_minute()").fetchone()[0]
            rows = self._execute(
                conn, "select minute, outcome, sum(n) from (select minute, outcome, n from "
                "litetq_counts where minute > ? union all select minute, outcome, 1 from "
                "litetq_count_deltas where minute > ?) c group by minute, outcome",
                (now - minutes * 60, now - minutes * 60)).fetchall()
        return now, rows

    def fold_counts(self):
        """Fold PostgreSQL's deltas into the counts, and minutes older than KEEP_MINUTES
        into minute 0. The supervisor runs it every second; it writes only when there
        is something to fold."""
        self._fold_deltas()
        old = self.query_one("select litetq_minute() - ?, exists (select 1 from litetq_counts "
                             "where minute > 0 and minute <= litetq_minute() - ?)",
                             (KEEP_MINUTES * 60, KEEP_MINUTES * 60))
        if old[1]:
            self.transact(lambda conn: self._fold_minutes(conn, old[0]))

    def _fold_minutes(self, conn, until):
        self._execute(conn, "insert into litetq_counts select 0, queue, task, outcome, sum(n) "
                      "from litetq_counts where minute > 0 and minute <= ? group by queue, task, "
                      "outcome order by queue, task, outcome on conflict (minute, queue, task, "
                      "outcome) do update set n = litetq_counts.n + excluded.n", (until,))
        self._execute(conn, "delete from litetq_counts where minute > 0 and minute <= ?",
                      (until,))

    def _fold_deltas(self):
        """PostgreSQL: move the deltas its triggers appended into the counts."""

    def ended(self):
        """Take the (job id, status, error) of the jobs that this thread's transactions
        made terminal since the last call, subtasks' parents included."""
        ended, self._local.ended = getattr(self._local, "ended", []), []
        return ended

    def running_steps(self):
        """(job id, task name, worker id) of every running step."""
        return sorted(self.query("select id, name, worker from litetq_jobs where "
                                 "status = 'running'"))  # sorted here: the index has them

    # The web page's queries: each reads an index, or a bounded range of ids.

    def find_jobs(self, status=None, queue=None, name=None, search=None, before=None,
                  limit=100):
        """Rows (dicts, newest first) of the jobs with ids below `before` that match, and
        the `before` of the next page (None when nothing older is left to look at).

        Status and queue filters read litetq_jobs_queue: one short range per queue or
        per status, merged. A task name or a search reads at most SEARCH_SPAN ids below
        `before`: when fewer than `limit` match there, the next page starts where this
        one stopped looking. (One index for the page, not one per filter: every index
        costs every .delay() another page written.)"""
        if name is None and search is None:
            ids = self._indexed_ids(status, queue, before, limit + 1)
            if ids is not None:
                more = ids[limit - 1] if len(ids) > limit else None
                return self._job_rows(ids[:limit]), more
        return self._scan_jobs(status, queue, name, search, before, limit)

    def _indexed_ids(self, status, queue, before, count):
        """The newest `count` ids below `before` of a status and/or queue; None when
        there are too many queues to merge."""
        where, params = _job_filter(status, queue, None, before)
        if (status is None) == (queue is None):  # the index, or the ids themselves
            return [r[0] for r in self.query(f"select id from litetq_jobs where {where} "
                                             "order by id desc limit ?", (*params, count))]
        if status is None:
            column, values = "status", STATUSES
        else:
            column, values = "queue", [r[0] for r in self.query(QUEUE_NAMES)]
            if len(values) > MERGE_MAX:
                return None
        if not values:
            return []
        part = (f"select id from (select id from litetq_jobs where {where} and {column} = ? "
                "order by id desc limit ?) as s{}")
        sql = " union all ".join(part.format(i) for i in range(len(values)))
        params = [p for value in values for p in (*params, value, count)]
        return [r[0] for r in self.query(f"{sql} order by id desc limit ?", (*params, count))]

    def _scan_jobs(self, status, queue, name, search, before, limit):
        """find_jobs() through at most SEARCH_SPAN ids below `before`."""
        # Two subqueries: SQLite reads min() or max() from the index only when alone.
        low, top = self.query_one("select (select min(id) from litetq_jobs), "
                                  "(select max(id) from litetq_jobs)")
        top = top + 1 if before is None and top is not None else before
        if top is None:
            return [], None
        # Without a status, litetq_jobs_queue would read the whole queue: the range of
        # ids must bound the work instead.
        where, params = _job_filter(status, queue, name, None, indexed=status is not None)
        if search is not None:
            match, terms = self._search_clause(search)
            where, params = f"{where} and {match}", params + terms
        floor = top - SEARCH_SPAN
        ids = [r[0] for r in self.query(
            f"select id from litetq_jobs where {where} and id >= ? and id < ? "
            "order by id desc limit ?", (*params, floor, top, limit + 1))]
        if len(ids) > limit:
            more = ids[limit - 1]
        else:
            more = floor if low is not None and floor > low else None
        ids = ids[:limit]
        number = None if search is None else _search_id(search)
        if before is None and number is not None and number not in ids:
            hit = self.query_one(f"select id from litetq_jobs where {where} and id = ?",
                                 (*params, number))
            ids = ([hit[0]] if hit else []) + ids  # an id typed in is found however old
        return self._job_rows(ids), more

    def _search_clause(self, search):
        """SQL matching `search` in a job's task name, arguments or error (or its id)."""
        pattern = "%" + re.sub(r"([\\%_])", r"\\\1", search) + "%"
        like = self.like
        sql = (f"(name {like} ? escape '\\' or args {like} ? escape '\\' "
               f"or error {like} ? escape '\\'")
        terms = [pattern] * 3
        if _search_id(search) is not None:
            sql += " or id = ?"
            terms.append(_search_id(search))
        return sql + ")", terms

    def _job_rows(self, ids):
        if not ids:
            return []
        rows = self.query(f"select {JOB_COLUMNS} from litetq_jobs where id in "
                          f"({', '.join('?' * len(ids))})", ids)
        columns = JOB_COLUMNS.split(", ")
        found = {row[0]: dict(zip(columns, row)) for row in rows}
        return [found[i] for i in ids if i in found]

    def act_on_jobs(self, action, status=None, queue=None, name=None, search=None):
        """Retry (action "retry") or cancel ("cancel") every job that matches and whose
        state allows it, BULK_BATCH to a transaction; returns how many changed."""
        allowed = RETRYABLE if action == "retry" else UNFINISHED
        statuses = [s for s in ([status] if status else allowed) if s in allowed]
        count, before = 0, None
        while statuses:
            where, params = _job_filter(None, queue, name, before)
            where += f" and status in ({', '.join('?' * len(statuses))})"
            params += statuses
            if search is not None:
                match, terms = self._search_clause(search)
                where, params = f"{where} and {match}", params + terms
            ids = [r[0] for r in self.query(f"select id from litetq_jobs where {where} "
                                            "order by id desc limit ?", (*params, BULK_BATCH))]
            if not ids:
                break
            count += self.transact(lambda conn: sum(
                self._act(conn, action, job_id) for job_id in ids))
            before = ids[-1]
        return count

    def _act(self, conn, action, job_id):
        if action == "cancel":
            return self._cancel(conn, job_id)
        try:
            return self._retry(conn, job_id)
        except Error:  # its unique key is taken again: it stays as it is (nothing written)
            return False

    def purge(self, status, older_than, budget=None):
        """Delete the job trees (a root and every subtask, with their logs) whose root
        is `status` and finished over `older_than` seconds ago, PURGE_BATCH roots to
        a transaction; a tree with an unfinished job in it stays. With `budget`, stop
        after about that many seconds. Returns the number of jobs deleted."""
        deleted, after = 0, (-math.inf, 0)
        stop = None if budget is None else time.monotonic() + budget
        while after is not None and (stop is None or time.monotonic() < stop):
            count, after = self.transact(
                lambda conn: self._purge_batch(conn, status, older_than, after))
            deleted += count
        return deleted

    def _purge_batch(self, conn, status, older_than, after):
        """One batch of purge(): (jobs deleted, where the next batch starts or None)."""
        roots = self._execute(
            conn, "select id, finished from litetq_jobs where parent_id is null and "
            "finished is not null and status = ? and finished < litetq_now() - ? and "
            "(finished > ? or finished = ? and id > ?) order by finished, id limit ?",
            (status, older_than, after[0], after[0], after[1], PURGE_BATCH)).fetchall()
        deleted, ids = 0, [root for root, _ in roots]
        if not ids:
            return 0, None
        marks = ", ".join("?" * len(ids))
        parents = {row[0] for row in self._execute(
            conn, f"select distinct parent_id from litetq_jobs where parent_id in ({marks})",
            ids)}
        alone = [root for root in ids if root not in parents]  # most jobs: no subtasks
        if alone:
            marks = ", ".join("?" * len(alone))
            self._execute(conn, f"delete from litetq_logs where job_id in ({marks})", alone)
            deleted += self._execute(conn, f"delete from litetq_jobs where id in ({marks}) "
                                     "and status = ?", (*alone, status)).rowcount
        for root in ids:
            if root not in parents:
                continue
            tree = [row[0] for row in self._execute(conn, TREE, (root,))]
            marks = ", ".join("?" * len(tree))
            if self._execute(conn, f"select 1 from litetq_jobs where id in ({marks}) and "
                             f"status in {UNFINISHED_SQL} limit 1", tree).fetchone():
                continue  # a subtask still runs: the tree waits for the next pass
            self._execute(conn, f"delete from litetq_logs where job_id in ({marks})", tree)
            deleted += self._execute(conn, f"delete from litetq_jobs where id in ({marks})",
                                     tree).rowcount
        return deleted, (roots[-1][1], roots[-1][0]) if len(roots) == PURGE_BATCH else None

    def forget_workers(self, older_than):
        """Remove workers whose heartbeat stopped over `older_than` seconds ago."""
        return self.change("delete from litetq_workers where heartbeat < litetq_now() - ?",
                           (older_than,))

    # Limits and paused queues.

    def declare_limits(self, name, concurrency, rate, per):
        """Record a task's limits, which claims read, once per process and change."""
        if self._declared.get(name) == (concurrency, rate, per):
            return
        if concurrency is None and rate is None:
            self.change("delete from litetq_limits where name = ?", (name,))
        else:
            self.change("insert into litetq_limits values (?, ?, ?, ?) on conflict (name) do "
                        "update set concurrency = excluded.concurrency, rate = excluded.rate, "
                        "per = excluded.per", (name, concurrency, rate, per))
            self._limits_used = True
        self._declared[name] = (concurrency, rate, per)

    def pause(self, queue):
        self.change("insert into litetq_paused values (?) on conflict (queue) do nothing",
                    (queue,))
        self._limits_used = True

    @_transaction
    def resume(self, conn, queue):
        self._execute(conn, "delete from litetq_paused where queue = ?", (queue,))
        return self._execute(conn, "update litetq_jobs set parked = 0 where status = 'queued' "
                             "and parked = 3 and queue = ?", (queue,)).rowcount

    def paused(self):
        return {queue for (queue,) in self.query("select queue from litetq_paused")}

    def free_held(self):
        """The safety net under _free_slot(): for each key with free slots, release as
        many held steps. The supervisor runs it now and then."""
        held = self.query("select limit_key, count(*) from litetq_jobs where status = "
                          "'queued' and parked = 2 group by limit_key")
        for key, _ in held:
            self.transact(lambda conn: self._free_held_key(conn, key))

    def _free_held_key(self, conn, key):
        self._lock_key(conn, key)
        row = self._execute(conn, "select l.concurrency - (select count(*) from litetq_jobs "
                            "where status = 'running' and limit_key = ?) from litetq_jobs j "
                            "join litetq_limits l on l.name = j.name where j.status = 'queued' "
                            "and j.parked = 2 and j.limit_key = ? limit 1", (key, key)).fetchone()
        free = row[0] if row else 1  # a task no longer limited: its steps go free
        if free > 0:
            self._execute(conn, "update litetq_jobs set parked = 0 where id in (select id from "
                          "litetq_jobs where status = 'queued' and parked = 2 and limit_key = ? "
                          "order by priority desc, due, id limit ?)", (key, free))

    # Inside a step: logs, progress, cancellation.

    def add_log(self, job_id, level, message):
        self.change("insert into litetq_logs (job_id, time, level, message) "
                    "values (?, litetq_now(), ?, ?)", (job_id, level, _clean_text(message)))

    def logs(self, job_id):
        """Logs of a job and all its subtasks, oldest first. NotFound if the job is gone
        (a purge deletes its logs with it)."""
        rows = self.query(f"select time, level, message, job_id from litetq_logs where "
                          f"job_id in ({TREE}) order by time, id", (job_id,))
        if not rows:
            self.job_field(job_id, "id")
        return rows

    def set_progress(self, job_id, progress):
        self.change("update litetq_jobs set progress = ? where id = ?", (progress, job_id))

    # Raw payload queues.

    def put(self, queue, payload):
        return self.change("insert into litetq_messages (queue, payload, visible) "
                           "values (?, ?, litetq_now()) returning id", (queue, payload))[0][0]

    def get(self, queues, visibility):
        rows = self.change(
            "update litetq_messages set visible = litetq_now() + ?, deliveries = deliveries + 1 "
            "where id = (select id from litetq_messages where queue in "
            f"({', '.join('?' * len(queues))}) and visible <= litetq_now() order by visible, id "
            "limit 1 for update skip locked) returning id, queue, payload, deliveries",
            (visibility, *queues))
        return rows[0] if rows else None

    def messages_due(self, queues):
        marks = ", ".join("?" * len(queues))
        return self.query_one(f"select 1 from litetq_messages where queue in ({marks}) "
                              "and visible <= litetq_now() limit 1", tuple(queues)) is not None

    def ack(self, message_id):
        self.change("delete from litetq_messages where id = ?", (message_id,))

    def nack(self, message_id, delay):
        self.change("update litetq_messages set visible = litetq_now() + ? where id = ?",
                    (delay, message_id))

    # The cron table.

    def save_schedule(self, name, spec, call, tz, queue, next_run):
        """Add or change an entry; its next run is kept when spec and zone are unchanged."""
        self.change(
            "insert into litetq_cron (name, spec, task, tz, queue, next_run) "
            "values (?, ?, ?, ?, ?, ?) on conflict (name) do update set "
            "next_run = case when litetq_cron.spec = excluded.spec and "
            "coalesce(litetq_cron.tz, '') = coalesce(excluded.tz, '') "
            "then litetq_cron.next_run else excluded.next_run end, spec = excluded.spec, "
            "task = excluded.task, tz = excluded.tz, queue = excluded.queue",
            (name, spec, call, tz, queue, next_run))

    @_transaction
    def delete_schedule(self, conn, name):
        self._execute(conn, "delete from litetq_cron_fired where name = ?", (name,))
        return self._execute(conn, "delete from litetq_cron where name = ?",
                             (name,)).rowcount > 0

    def schedules(self):
        return self.query("select name, spec, task, tz, queue, next_run, last_run "
                          "from litetq_cron order by name")

    def fire_schedules(self, now, plan):
        """In one write transaction: for each cron entry due at `now`, `plan(entry)`
        (entry: name, spec, task, tz, queue, next_run) says (fire time, job row, next
        run, last run); the job of that fire time is enqueued unless it already has one
        (the primary key of litetq_cron_fired guards this) and the entry moves on.
        Returns the new jobs' ids."""
        def fire(conn):
            ids = []
            entries = self._execute(conn, "select name, spec, task, tz, queue, next_run from "
                                    "litetq_cron where next_run <= ? for update",
                                    (now,)).fetchall()
            for entry in entries:
                fire_time, row, next_run, last_run = plan(entry)
                name = entry[0]
                self._execute(conn, "update litetq_cron set next_run = ?, last_run = ? "
                              "where name = ?", (next_run, last_run, name))
                if self._execute(conn, "select 1 from litetq_cron_fired where name = ? "
                                 "and fire_time = ?", (name, fire_time)).fetchone():
                    continue
                job_id = self._insert(conn, [row])[0]
                self._execute(conn, "insert into litetq_cron_fired values (?, ?, ?)",
                              (name, fire_time, job_id))
                # The records only guard against a fire time being taken twice at once.
                self._execute(conn, "delete from litetq_cron_fired where name = ? and "
                              "fire_time < ?", (name, fire_time - 86400))
                ids.append(job_id)
            return ids
        return self.transact(fire)

    # Workers.

    def register_worker(self, worker_id, queues, concurrency):
        self.change("insert into litetq_workers values (?, ?, ?, ?, ?, litetq_now(), "
                    "litetq_now()) on conflict (id) do update set host = excluded.host, "
                    "pid = excluded.pid, queues = excluded.queues, concurrency = "
                    "excluded.concurrency, started = excluded.started, "
                    "heartbeat = excluded.heartbeat",
                    (worker_id, socket.gethostname(), os.getpid(), queues, concurrency))

    def heartbeat(self, worker_id):
        self.change("update litetq_workers set heartbeat = litetq_now() where id = ?",
                    (worker_id,))

    def unregister_worker(self, worker_id):
        self.change("delete from litetq_workers where id = ?", (worker_id,))

    def workers(self):
        """(id, host, pid, queues, concurrency, started, seconds since its heartbeat)."""
        return self.query("select id, host, pid, queues, concurrency, started, "
                          "litetq_now() - heartbeat from litetq_workers order by started")

    # The schema.

    def _open_schema(self, ddl_types):
        """Check the schema version, and create or upgrade the tables only if needed:
        opening an up-to-date database writes nothing."""
        version = self._schema_version()
        if version == SCHEMA_VERSION:
            return
        if version is not None and version > SCHEMA_VERSION:
            raise Error(f"{self.name} holds a litetq schema version {version}, newer than "
                        f"this litetq {__version__} knows ({SCHEMA_VERSION}): upgrade litetq")
        if version is None and not self.create:
            raise Error(f"{self.name} holds no litetq tables (a worker, or enqueueing a "
                        f"job, creates them)")
        if self.readonly:
            raise Error(f"{self.name} was written by an older litetq: open it once "
                        f"with this version (not read-only) to upgrade it")

        def create(conn):
            self._lock_schema(conn)
            found = self._schema_version(conn)  # another process may have done it meanwhile
            if found == SCHEMA_VERSION:
                return
            for migration in ((MIGRATE_FROM_1,) if found == 1 else ()) + (
                    (MIGRATE_FROM_2,) if found in (1, 2) else ()):
                for statement in migration.split(";"):
                    if statement.strip():
                        self._execute(conn, statement)
            for statement in SCHEMA.format(**ddl_types).split(";"):
                if statement.strip():
                    self._execute(conn, statement)
            self._after_schema(conn)
            if found is not None and found < 3:
                self._execute(conn, COUNTS_FROM_JOBS)
            self._execute(conn, "insert into litetq_meta values ('schema', ?) on conflict (key) "
                          "do update set value = excluded.value", (str(SCHEMA_VERSION),))
        self.transact(create)

    def _schema_version(self, conn=None):
        """The schema version stored in the database, or None if it has no tables."""
        raise NotImplementedError

    def _lock_schema(self, conn):
        """Inside the schema's transaction: keep other processes from creating it too."""

    def _after_schema(self, conn):
        """What a dialect adds to the tables (PostgreSQL: the NOTIFY triggers)."""


def _job_filter(status, queue, name, before, indexed=True):
    """A "where" clause (never empty) and its parameters for the jobs list's filters;
    with indexed=False, written so that no index on status, queue or name serves it
    (`column || ''` is an expression, which no plain index matches)."""
    clauses, params = ["1 = 1"], []
    for column, value in (("status", status), ("queue", queue), ("name", name)):
        if value is not None:
            clauses.append(f"{column} = ?" if indexed else f"{column} || '' = ?")
            params.append(value)
    if before is not None:
        clauses.append("id < ?")
        params.append(before)
    return " and ".join(clauses), params


def _search_id(search):
    """The job id a search could mean (it is all digits), else None."""
    if search.isascii() and search.isdigit() and len(search) < 19:
        return int(search)
    return None


def _epoch():
    return time.time()  # looked up at each call, so tests may shift the clock


def _is_busy(exc):
    return "locked" in str(exc)  # SQLITE_BUSY and SQLITE_LOCKED; 3.10 has no error codes


class SQLiteStorage(Storage):
    """SQLite in WAL mode: readers never wait, and one connection at a time writes.

    Writers wait for the lock in this process rather than in SQLite's busy handler,
    which sleeps up to 100 ms between tries: against atomic steps that take the lock
    back to back it lost for seconds. Every few hundred microseconds instead, and
    each process leaves the lock free for a while after an atomic step (begin_step).
    ":memory:" is one shared connection behind a lock, since each connection to
    ":memory:" is a database of its own.
    """

    driver_errors = (sqlite3.Error,)
    count_alone = True
    max_connections = 16  # one writes at a time anyway; fewer connections, fewer open files

    def __init__(self, path, synchronous="NORMAL", readonly=False, create=True):
        level = str(synchronous).upper()
        if level not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        self.path, self.memory = path, path == ":memory:"
        super().__init__(path, readonly and not self.memory, create or self.memory)
        self.synchronous, self.busy_timeout = level, BUSY_TIMEOUT
        self._lock = threading.RLock()  # ":memory:": the shared connection's
        self._step_pause_until = 0.0  # monotonic time before which no atomic step begins
        self._step_began = {}  # id of an atomic step's connection -> when it began
        self._shared = self._connect() if self.memory else None
        if not self.create and not os.path.exists(path):
            raise Error(f"no database at {path!r}")
        # Job and message ids are never given out twice (SQLite's plain INTEGER PRIMARY
        # KEY hands the ids of the newest deleted rows out again, so a purged job's
        # handle, or a late ack, would reach a new row): AUTOINCREMENT, which costs
        # an update of sqlite_sequence per insert (https://sqlite.org/autoinc.html).
        # Databases made before keep their tables: `create table if not exists` leaves
        # them, and rebuilding a queue's tables on open is no upgrade to spring on a
        # user, so ids there may come back after the newest rows are purged.
        self._open_schema({"id": "integer primary key",
                           "serial": "integer primary key autoincrement", "real": "real"})

    def _connect(self):
        try:
            if self.readonly:
                conn = self._connect_readonly()
            else:
                conn = sqlite3.connect(self.path, timeout=0, isolation_level=None,
                                       check_same_thread=False)
                conn.create_function("litetq_now", 0, _epoch)
                self._wait_for_lock(conn.execute, "pragma journal_mode = wal")
            conn.execute(f"pragma synchronous = {self.synchronous}")
            # Truncate the WAL after checkpoints so a busy queue's file stays small.
            conn.execute("pragma journal_size_limit = 16777216")
        except sqlite3.DatabaseError as exc:
            raise Error(f"cannot open {self.path!r} as a litetq database: {exc}") from None
        return conn

    def _connect_readonly(self):
        """Read without writing a byte: mode=ro, or, where even the -shm file cannot be
        made (a read-only directory) and the WAL is empty, immutable=1."""
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path))
        try:
            conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.OperationalError:
            wal = self.path + "-wal"
            if os.path.exists(wal) and os.path.getsize(wal):
                raise Error(f"cannot read {self.path!r}: it is read-only, and its latest "
                            f"commits are still in {wal}, which SQLite can only read with "
                            f"write access to the folder") from None
            conn = sqlite3.connect(uri + "?immutable=1", uri=True, timeout=0,
                                   isolation_level=None, check_same_thread=False)
        conn.create_function("litetq_now", 0, _epoch)
        return conn

    def _acquire(self):
        if self.memory:
            self._lock.acquire()
            return self._shared
        return super()._acquire()

    def _adopt(self, conn):
        if not isinstance(conn, sqlite3.Connection):
            raise TypeError(f"conn= must be an open sqlite3.Connection on {self.path}, "
                            f"not {type(conn).__module__}.{type(conn).__name__}")
        conn.create_function("litetq_now", 0, _epoch)
        return conn

    def _release(self, conn, reuse):
        if self.memory:
            self._lock.release()
        else:
            super()._release(conn, reuse)

    def close(self):
        super().close()
        if self._shared is not None:
            with self._lock:
                self._shared.close()

    def _translate(self, sql):
        # One writer at a time: nothing to lock row by row. The minute is the wall
        # clock's, through a built-in function, so the triggers work on every
        # connection, litetq_now() or not.
        return (sql.replace(" for update skip locked", "").replace(" for update", "")
                .replace("litetq_minute()", "(cast(strftime('%s', 'now') as integer) / 60 * 60)"))

    def _after_schema(self, conn):
        for statement in SQLITE_DDL:
            self._execute(conn, statement)

    def _begin(self, conn):
        self._wait_for_lock(conn.execute, "begin immediate")

    def _execute(self, conn, sql, params=()):
        try:
            return conn.execute(self._sql(sql), params)
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
        return self._wait_for_lock(conn.execute, self._sql(sql), params)

    def _wait_for_lock(self, run, *args):
        """Run a statement, trying again while another connection holds the lock it
        needs, until busy_timeout passes: then Error, saying what holds it."""
        deadline, pause = time.monotonic() + self.busy_timeout, 0.0001
        while True:
            try:
                return run(*args)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if time.monotonic() > deadline:
                    raise Error(
                        f"{self.path}: the database is locked: another connection held its "
                        f"write lock for over {self.busy_timeout:g} s (a long transaction, "
                        f"or an atomic step doing slow work while it holds the lock)") from None
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 1.5, LOCK_WAIT_SLICE)

    def _error(self, exc):
        return Error(f"{self.path}: {exc}")

    def _insert_many(self, conn, sql, rows):
        if len(rows) == 1:
            return [self._execute(conn, sql, rows[0]).lastrowid]
        self._wait_for_lock(conn.executemany, self._sql(sql), rows)
        # Rows inserted in one write transaction get consecutive rowids, each the
        # largest so far plus one (https://sqlite.org/autoinc.html).
        last = conn.execute("select last_insert_rowid()").fetchone()[0]
        return list(range(last - len(rows) + 1, last + 1))

    def begin_step(self):
        """An atomic step holds the one write lock until it ends. Back to back, one
        process's atomic steps would keep it from every other writer, so each leaves
        it free for a quarter of the time the last one held it (at most 20 ms)."""
        pause = self._step_pause_until - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        conn = super().begin_step()
        self._step_began[id(conn)] = time.monotonic()
        return conn

    def end_step(self, conn, commit):
        try:
            super().end_step(conn, commit)
        finally:
            now = time.monotonic()
            held = now - self._step_began.pop(id(conn), now)
            self._step_pause_until = now + min(held * (1 - ATOMIC_SHARE) / ATOMIC_SHARE, 0.02)

    def clock(self):
        return time.time()

    def _schema_version(self, conn=None):
        with contextlib.ExitStack() as stack:
            if conn is None:
                conn = stack.enter_context(self.connection())
            if not self._execute(conn, "select 1 from sqlite_master where type = 'table' "
                                 "and name = 'litetq_meta'").fetchone():
                return None
            row = self._execute(conn, "select value from litetq_meta "
                                "where key = 'schema'").fetchone()
            return int(row[0]) if row else None

    def maintain(self):
        """Keep the WAL small. SQLite truncates it only after a checkpoint that
        completes, which constant writes never let happen (auto-checkpoints are
        PASSIVE: https://sqlite.org/wal.html#avoiding_excessively_large_wal_files), so
        past WAL_LIMIT the supervisor checkpoints with TRUNCATE, which holds writers
        off while it copies the WAL into the database."""
        if self.memory or self.readonly:
            return
        try:
            if os.path.getsize(self.path + "-wal") < WAL_LIMIT:
                return
        except OSError:
            return
        # Tried as often as writers try for the lock; once it has the lock, each try
        # waits a little for readers of older snapshots to finish.
        with self.connection() as conn:
            conn.execute("pragma busy_timeout = 20")
            try:
                deadline = time.monotonic() + 1.0
                while conn.execute("pragma wal_checkpoint(truncate)").fetchone()[0] and \
                        time.monotonic() < deadline:
                    time.sleep(0.0002 * (0.5 + random.random()))
            finally:
                conn.execute("pragma busy_timeout = 0")

    def _watch(self):
        """Hear other connections' commits: inotify on the WAL file where there is one
        (Linux), confirmed by PRAGMA data_version; elsewhere, data_version every
        IDLE_POLL while anyone waits."""
        conn = self._connect()  # its own, which also keeps the WAL file in being
        notifier = None
        with contextlib.suppress(Exception):  # not Linux, or out of inotify instances
            notifier = _FileWatch(self.path + "-wal")
        try:
            version = conn.execute("pragma data_version").fetchone()[0]
            self._heard()  # what committed before we looked: waiters look for themselves
            while not self._closed:
                if notifier is not None:
                    notifier.wait(0.25)
                    if notifier.gone:
                        notifier.close()
                        notifier = _FileWatch(self.path + "-wal")
                else:
                    time.sleep(IDLE_POLL if self._waiting else 0.05)
                # The WAL is written before the commit shows: look again for a moment.
                for _ in range(20 if notifier is not None else 1):
                    latest = conn.execute("pragma data_version").fetchone()[0]
                    if latest != version:
                        version = latest
                        self._heard()
                        time.sleep(CHANGE_COALESCE)
                        break
                    time.sleep(0.0002 if notifier is not None else 0)
        finally:
            conn.close()
            if notifier is not None:
                notifier.close()


class _FileWatch:
    """Blocks until a file is written: inotify(7) through ctypes, Linux only."""

    def __init__(self, path):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(self.fd, os.fsencode(path), 0x2) < 0:  # IN_MODIFY
            error = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(error, f"cannot watch {path}")
        self.gone = False

    def wait(self, timeout):
        """True if the file was written within `timeout` seconds."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        with contextlib.suppress(BlockingIOError):
            while True:
                data = os.read(self.fd, 4096)
                offset = 0
                while offset + 16 <= len(data):  # struct inotify_event
                    _, mask, _, length = struct.unpack_from("iIII", data, offset)
                    self.gone |= bool(mask & 0x8000)  # IN_IGNORED: the file was removed
                    offset += 16 + length
        return True

    def close(self):
        os.close(self.fd)


class PostgresStorage(Storage):
    """PostgreSQL through psycopg 3, for queues shared by many hosts.

    Row locks instead of one writer: claims skip rows another worker is taking
    ("for update skip locked"), atomic steps of different jobs run side by side,
    and a waiting parent's row is locked before its subtasks are counted. Every
    time is the server's clock (`litetq_now()` is clock_timestamp()), so clock
    skew between hosts never makes a live lease look lapsed. Triggers NOTIFY the
    channel "litetq" when work arrives or a job changes state; each process LISTENs
    on a connection of its own, and everyone also polls, so a lost notification
    only delays. Tables live in the schema the connection's search_path selects.
    """

    like = "ilike"  # "like" is case-sensitive here
    max_connections = 10

    def __init__(self, url, readonly=False, create=True):
        try:
            import psycopg
            import psycopg.rows
        except ImportError:
            raise Error('litetq needs psycopg 3 for PostgreSQL: '
                        'pip install "litetq[postgres]"') from None
        self.psycopg, self.url = psycopg, url
        self.driver_errors = (psycopg.Error,)
        self._secrets = _url_secrets(url)
        super().__init__(_redact(url), readonly, create)
        try:
            self._params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:  # its message may quote the password: scrubbed
            raise Error(f"malformed PostgreSQL URL {self.name!r}: "
                        f"{self._scrub(_one_line(exc))}") from None
        self._params.setdefault("connect_timeout", "10")
        self._params.setdefault("tcp_user_timeout", "10000")  # ms: a vanished host errs
        identity = "bigint generated by default as identity primary key"  # never reused
        self._open_schema({"id": identity, "serial": identity, "real": "double precision"})

    def _connect(self):
        psycopg = self.psycopg
        try:
            conn = psycopg.connect(**self._params, autocommit=True)
        except psycopg.ProgrammingError as exc:
            raise Error(f"malformed PostgreSQL URL {self.name!r}: "
                        f"{self._scrub(_one_line(exc))}") from None
        except psycopg.Error as exc:
            text = self._scrub(_one_line(exc))
            # A wrong password, user or database stays wrong: no point trying again.
            permanent = "authentication failed" in text or "does not exist" in text
            raise (Error if permanent else _Unreachable)(
                f"cannot connect to {self.name}: {text}") from None
        if self.readonly:
            conn.execute("set default_transaction_read_only = on")
        return conn

    def _translate(self, sql):
        return (sql.replace("%", "%%").replace("?", "%s")
                .replace("litetq_now()", "extract(epoch from clock_timestamp())::float8")
                .replace("litetq_minute()",
                         "(floor(extract(epoch from clock_timestamp()) / 60)::bigint * 60)"))

    def _execute(self, conn, sql, params=()):
        return conn.cursor(row_factory=self.psycopg.rows.tuple_row).execute(
            self._sql(sql), params)

    def _in_transaction(self, conn):
        return conn.info.transaction_status != self.psycopg.pq.TransactionStatus.IDLE

    def _reusable(self, conn):
        if conn.closed or conn.broken:
            return False
        if self._in_transaction(conn):
            with contextlib.suppress(self.psycopg.Error):
                conn.rollback()
        return not conn.closed and not self._in_transaction(conn)

    def _retryable(self, exc):
        errors = self.psycopg.errors
        return isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure))

    def _error(self, exc):
        errors = self.psycopg.errors
        diag = getattr(exc, "diag", None)
        text = self._scrub(diag and diag.message_primary or _one_line(exc))
        if isinstance(exc, (self.psycopg.OperationalError, self.psycopg.InterfaceError)) \
                and not isinstance(exc, errors.QueryCanceled):
            return _Unreachable(f"{self.name}: the server dropped the connection: {text}")
        if isinstance(exc, errors.InsufficientPrivilege):
            return Error(f"{self.name}: {text} (litetq creates its tables on first use: "
                         f"grant the user CREATE on the schema, or open it once as a user "
                         f"who may)")
        if isinstance(exc, errors.InvalidSchemaName):
            return Error(f"{self.name}: {text} (the search_path names no schema that "
                         f"exists: CREATE SCHEMA it first, or fix the URL's options)")
        return Error(f"{self.name}: {text}")

    def _scrub(self, text):
        """`text` with every form of the URL's password in it replaced by ***."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _adopt(self, conn):
        if not isinstance(conn, self.psycopg.Connection):
            raise TypeError(f"conn= must be an open psycopg connection to {self.name}, "
                            f"not {type(conn).__module__}.{type(conn).__name__}")
        return conn

    def _insert_many(self, conn, sql, rows):
        if len(rows) == 1:
            return [self._execute(conn, sql + " returning id", rows[0]).fetchone()[0]]
        cursor = conn.cursor(row_factory=self.psycopg.rows.tuple_row)
        cursor.executemany(self._sql(sql + " returning id"), rows, returning=True)
        ids = []
        while True:
            ids.append(cursor.fetchone()[0])
            if not cursor.nextset():
                return ids

    def clock(self):
        return self.query_one("select litetq_now()")[0]

    def _schema_version(self, conn=None):
        with contextlib.ExitStack() as stack:
            if conn is None:
                conn = stack.enter_context(self.connection())
            if self._execute(conn, "select to_regclass('litetq_meta')").fetchone()[0] is None:
                return None
            row = self._execute(conn, "select value from litetq_meta "
                                "where key = 'schema'").fetchone()
            return int(row[0]) if row else None

    def _lock_key(self, conn, key):
        self._execute(conn, "select pg_advisory_xact_lock(hashtext(?))", (f"litetq {key}",))

    def _lock_schema(self, conn):
        # Many processes may open an empty database at once: one creates the tables.
        self._execute(conn, "select pg_advisory_xact_lock(hashtext('litetq schema ' || "
                      "coalesce(current_schema(), '')))")

    def _after_schema(self, conn):
        for statement in POSTGRES_DDL:
            self._execute(conn, statement)

    def _fold_deltas(self):
        # One DELETE ... RETURNING per table: a delta is folded by exactly one
        # supervisor (a concurrent delete skips the rows another one took), and rows in
        # key order, so two folds cannot deadlock on the counts they both add to.
        if not self.query_one("select exists (select 1 from litetq_count_deltas)")[0]:
            return
        self.change("with moved as (delete from litetq_count_deltas returning minute, queue, "
                    "task, outcome) insert into litetq_counts select minute, queue, task, "
                    "outcome, count(*) from moved group by minute, queue, task, outcome order "
                    "by minute, queue, task, outcome on conflict (minute, queue, task, "
                    "outcome) do update set n = litetq_counts.n + excluded.n")

    def _watch(self):
        conn = self._connect()
        try:
            conn.execute("listen litetq")
            self._heard()  # what committed before we listened: waiters look for themselves
            while not self._closed:
                for _ in conn.notifies(timeout=1.0, stop_after=1):
                    self._heard()
                    time.sleep(CHANGE_COALESCE)
        finally:
            conn.close()


# Notifications: new work (an insert, a step queued again, a delayed step due) and
# every change of status that a waiter may be waiting for. Claims (to 'running')
# and lease renewals notify nobody.
POSTGRES_DDL = (
    "create or replace function litetq_notify() returns trigger language plpgsql as "
    "$$ begin perform pg_notify('litetq', ''); return null; end $$",
    "drop trigger if exists litetq_jobs_inserted on litetq_jobs",
    "create trigger litetq_jobs_inserted after insert on litetq_jobs "
    "for each statement execute function litetq_notify()",
    "drop trigger if exists litetq_jobs_changed on litetq_jobs",
    "create trigger litetq_jobs_changed after update of status, parked on litetq_jobs "
    "for each row when (new.status <> 'running' and (old.status <> new.status "
    "or old.parked <> new.parked)) execute function litetq_notify()",
    "drop trigger if exists litetq_messages_put on litetq_messages",
    "create trigger litetq_messages_put after insert on litetq_messages "
    "for each statement execute function litetq_notify()",
    # Counting: see COUNTED. Deltas are appended, so workers never wait for each other.
    "create or replace function litetq_count() returns trigger language plpgsql as $$ begin "
    f"insert into litetq_count_deltas values (litetq_minute(), new.queue, old.name, "
    f"{OUTCOME}); return null; end $$",
    "drop trigger if exists litetq_jobs_counted on litetq_jobs",
    "create trigger litetq_jobs_counted " + COUNT_TRIGGER.format(
        columns="resume, finished, steps", each=" for each row") +
    " execute function litetq_count()",
    "create or replace function litetq_forget() returns trigger language plpgsql as $$ begin "
    f"{REMOVED}; return null; end $$",
    "drop trigger if exists litetq_jobs_retried on litetq_jobs",
    "create trigger litetq_jobs_retried " + RETRY_TRIGGER.format(each=" for each row") +
    " execute function litetq_forget()",
    "drop trigger if exists litetq_jobs_forgotten on litetq_jobs",
    "create trigger litetq_jobs_forgotten after delete on litetq_jobs for each row "
    f"when (old.status in {TERMINAL_SQL}) execute function litetq_forget()",
)


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def _redact(url):
    """A URL for messages and logs: the password, in the user part or the query, if
    any, replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError as exc:
        raise Error(f"malformed PostgreSQL URL: {exc}") from None
    if password is not None:
        netloc = parts.netloc.rpartition("@")
        user = netloc[0].partition(":")[0]
        parts = parts._replace(netloc=f"{user}:***@{netloc[2]}")
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _url_secrets(url):
    """The texts a message about `url` must not show: its password as written and as
    decoded, where Python's URL parser finds it (after the last "@" of the host part),
    where libpq does (before the first "@"), and in a password= query parameter.
    Longest first, so a password containing another is scrubbed whole."""
    authority = url.partition("://")[2]
    found = [part.partition("&")[0] for part in re.findall(r"(?:^|[?&])password=([^&#]*)",
                                                            authority.partition("?")[2])]
    libpq = re.match(r"([^@/]*)@", authority)  # libpq: user info ends at an "@" before "/"
    for userinfo in (re.split(r"[/?#]", authority, maxsplit=1)[0].rpartition("@")[0],
                     libpq[1] if libpq else "", authority.partition("?")[0].rpartition("@")[0]):
        found.append(userinfo.partition(":")[2])
    secrets = set()
    for secret in found:
        secrets.update((secret, urllib.parse.unquote(secret),
                        urllib.parse.unquote_plus(secret)))
    secrets.discard("")
    return sorted(secrets, key=len, reverse=True)


def _shown(target):
    """A database path or URL as messages and logs show it: without a password."""
    try:
        return _redact(target) if _is_url(target) else target
    except Error:
        return "(a malformed PostgreSQL URL)"


def _is_url(target):
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def open_storage(target, synchronous=None, readonly=False, create=True):
    """The storage for a SQLite path (or ":memory:"), or a postgresql:// URL."""
    if _is_url(target):
        if synchronous is not None:
            raise ValueError("synchronous= is SQLite's; on PostgreSQL durability is the "
                             "server's (see its synchronous_commit setting)")
        return PostgresStorage(target, readonly, create)
    return SQLiteStorage(target, "NORMAL" if synchronous is None else synchronous, readonly,
                         create)


# --- The queue API -----------------------------------------------------------

class Queue:
    """A durable job queue in one database: a SQLite file, ":memory:" for tests, or a
    PostgreSQL URL shared by many hosts.

    `synchronous="FULL"` makes each SQLite commit survive power loss; the default
    "NORMAL" survives application crashes. `lease` is how long a claimed step is ours
    without renewal: a worker that dies is noticed this many seconds later.
    `readonly=True` opens the database without ever writing to it; `create=False`
    refuses one that holds no litetq tables (or, on SQLite, no file) instead of
    creating them.
    """

    def __init__(self, path, synchronous=None, *, lease=DEFAULT_LEASE, readonly=False,
                 create=True):
        self.path, self.lease = os.fspath(path), _seconds(lease, "lease", positive=True)
        self.storage = open_storage(self.path, synchronous, readonly, create)
        self._claims = {}  # job id -> token of the steps this process has claimed
        self._finished = []  # deferred successes, see _save_finished()
        self._durations = {}  # task name -> typical seconds per step (workers batch quick ones)
        self._keeper = None  # (pid, thread) renewing those claims' leases
        self._closed = threading.Event()
        self._worker_id = (None, None)

    def __repr__(self):
        return f"<litetq.Queue {self.storage.name!r}>"  # a URL's password never shows

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
        caller's open transaction on the same database and appears only if it commits."""
        row = _job_row(task, queue, priority, delay, at, ttl, unique)
        self._declare(row[2])
        job = Job(self, self.storage.insert_jobs([row], conn)[0])
        self.storage.changed()
        if _hooks["enqueued"]:
            # With conn=, "written" means written in the caller's transaction: the hook
            # runs before the caller commits or rolls back, which litetq cannot know.
            _fire("enqueued", job)
        return job

    def enqueue_many(self, tasks, *, queue=None, priority=None, delay=None, at=None, ttl=None,
                     unique=None, conn=None):
        """Add many calls in one transaction; returns their `Job`s in order."""
        rows = [_job_row(t, queue, priority, delay, at, ttl, unique) for t in tasks]
        if not rows:
            return []
        for name in {row[2] for row in rows}:
            self._declare(name)
        jobs = [Job(self, job_id) for job_id in self.storage.insert_jobs(rows, conn)]
        self.storage.changed()
        for job in jobs if _hooks["enqueued"] else ():  # with conn=: see enqueue()
            _fire("enqueued", job)
        return jobs

    def _declare(self, name):
        """Record the limits of the task `name` runs, for every claim to read."""
        function = _registry.get(name)
        if function is not None and (function.concurrency or function.rate):
            self.storage.declare_limits(name, *function.limits)

    # Flow control and retention.

    def pause(self, queue):
        """Workers start no new step from `queue` until resume(queue); running steps
        finish, and enqueueing goes on. Stored in the database: every worker obeys."""
        self.storage.pause(_name(queue, "queue"))

    def resume(self, queue):
        """Let workers take steps from a paused queue again."""
        self.storage.resume(_name(queue, "queue"))
        self.storage.changed()

    def paused(self):
        """The set of paused queue names."""
        return self.storage.paused()

    def purge(self, status=None, older_than=None):
        """Delete finished jobs (whole trees: a root and its subtasks, with their logs)
        whose root is `status` (a status or a list; default every terminal one) and
        finished over `older_than` seconds ago (default 0). Returns the number deleted,
        subtasks included; nothing unfinished is ever deleted."""
        statuses = [status] if isinstance(status, str) else list(status or TERMINAL)
        for each in statuses:
            if each not in TERMINAL:
                raise ValueError(f"purge() deletes only finished jobs ({', '.join(TERMINAL)}), "
                                 f"not {each!r}")
        older_than = 0.0 if older_than is None else _seconds(older_than, "older_than")
        return sum(self.storage.purge(each, older_than) for each in statuses)

    # Reading jobs.

    def job(self, job_id):
        """The `Job` with this id; `NotFound` if there is none."""
        job_id = _valid_id(job_id)
        self.storage.job_field(job_id, "id")
        return Job(self, job_id)

    def jobs(self, status=None, queue=None, task=None, limit=100):
        """Jobs, newest first, filtered by status, queue name and task name."""
        if isinstance(task, (Task, TaskFunction)):
            task = task.name
        if limit is not None:
            limit = _integer(limit, "limit", 0)
        return [Job(self, i) for i in self.storage.jobs(status, queue, task, limit)]

    def stats(self):
        """{queue name: {status: count}}."""
        return self.storage.stats()

    # Observability: what /metrics and the web page show.

    def oldest_due(self):
        """{queue name: seconds its oldest due, queued job has waited}."""
        return self.storage.oldest_due()

    def step_counts(self):
        """{(queue, task, outcome): steps finished}, since the database was made: retention
        and restarts keep them. Outcomes: complete, continued, retried, failed,
        cancelled, expired."""
        return {tuple(row[:3]): int(row[3]) for row in self.storage.step_counts()}

    def steps_per_minute(self, minutes=60):
        """Steps finished per minute over the last `minutes` (this one included), by
        outcome: {"start": epoch of the first minute, "minutes": N, "series":
        {outcome: [N counts, oldest first]}}."""
        minutes = _integer(minutes, "minutes", 1, KEEP_MINUTES)
        now, rows = self.storage.steps_per_minute(minutes)
        start = now - (minutes - 1) * 60
        series = {outcome: [0] * minutes for outcome in OUTCOMES}
        for minute, outcome, n in rows:
            if outcome in series and start <= minute <= now:
                series[outcome][int(minute - start) // 60] += int(n)
        return {"start": int(start), "minutes": minutes, "series": series}

    def workers(self):
        """The live workers (a heartbeat within WORKER_LIVE seconds), oldest first, as
        dicts: id, host, pid, queues (a list, or None for all), concurrency,
        heartbeat_age (seconds) and steps (the {"id", "task"} of each step it runs)."""
        running = self.storage.running_steps()
        found = []
        for worker_id, host, pid, queues, concurrency, _, age in self.storage.workers():
            if age >= WORKER_LIVE:
                continue
            # A worker's processes claim as "<its id>/<process id>" (see Worker._start).
            steps = [{"id": job_id, "task": name} for job_id, name, holder in running
                     if holder == worker_id or (holder or "").startswith(worker_id + "/")]
            found.append({"id": worker_id, "host": host, "pid": pid,
                          "queues": None if queues in (None, "*") else queues.split(","),
                          "concurrency": concurrency, "heartbeat_age": max(age, 0.0),
                          "steps": steps})
        return found

    # Running work in this process.

    def run_until_idle(self, max_steps=None):
        """Run due steps here, one at a time in queue order, until nothing is due."""
        self.storage.reap()
        steps = 0
        while max_steps is None or steps < max_steps:
            if self._work_once():
                steps += 1
            elif self.storage.next_work() != 0.0:
                break
        return steps

    def _work_once(self, queues=None):
        """Run one due step or consumer message; False if there was none."""
        claims = self._claim(queues)
        if claims:
            self._run_step(claims[0])
            return True
        return self._consume_one(queues)

    def _claim(self, queues=None, limit=1):
        """storage.claim(), and the "finished" hooks of the steps it found expired."""
        expired = []
        claims = self.storage.claim(self.worker_id, self.lease, queues, limit, expired)
        ended = [each for each in self.storage.ended() if each[0] not in expired]
        for job_id in expired:
            self._step_ended(job_id, "expired", "expired: waited longer than its ttl", 0.0,
                             ended=ended)
            ended = ()
        return claims

    def _run_step(self, claim, defer=False):
        """Run one claimed step and commit its outcome; returns the job's new status.
        With `defer`, a success is only noted, for _save_finished() to commit later."""
        self._claims[claim.id] = claim.token
        self._keep_leases()
        try:
            return self._execute(claim, defer)
        finally:
            if not defer:
                self._claims.pop(claim.id, None)
                self.storage.changed()

    def _execute(self, claim, defer=False):
        try:
            function = _lookup_task(claim.name)
        except Error as exc:
            return self._unregistered(claim, exc)
        if function.is_async:  # here, outside a worker's loop: one of its own, where its
            # timeout cancels it as a worker's does (only kill-based timeouts are theirs)
            return _run_coroutine(self._aexecute(claim, function.timeout), f"job {claim.id}")
        context = Context(self, Job(self, claim.id), claim.attempts, function.atomic,
                          claim.token)
        reset = _current.set(context)
        began = time.monotonic()
        try:
            if _hooks["started"]:
                _fire("started", context.job, attempt=claim.attempts)
            params, kwargs = loads(claim.args)
            result, call = _outcome(function.func(*params, **kwargs),
                                    claim.rest and loads(claim.rest))
            if call is not None:
                self._declare(call[0])
            if defer and context._step is None:
                self._finished.append((claim, result, call, time.monotonic() - began))
                return "complete" if call is None else "queued"
            try:
                status = self.storage.step_succeeded(claim.id, claim.token,
                                                     (claim.queue, claim.name), result, call)
                context._end_transaction(commit=True)
            except Exception as exc:  # the database refused it: this attempt failed
                raise _Unsaved(exc) from None
        except Exception as exc:
            context._end_transaction(commit=False)
            return self._fail_attempt(function, claim, exc, duration=time.monotonic() - began)
        finally:
            _current.reset(reset)
        if status is None:
            logger.warning("job %s lost its claim while running (its lease lapsed)", claim.id)
        self._step_ended(claim.id, status, None, time.monotonic() - began)
        return status

    def _unregistered(self, claim, exc):
        status = self.storage.step_failed(claim.id, claim.token, str(exc), None)
        self._step_ended(claim.id, status, str(exc), 0.0)
        return status

    def _step_ended(self, job_id, status, error, duration, delay=None, ended=None):
        """Run the hooks of a step whose outcome is committed: "retrying" when it is
        queued again after a failure (`delay` given), "finished" when the job ended,
        and for a parent that ended with it (`ended`: storage.ended(), taken in the
        thread that saved the outcome)."""
        if status == "queued" and delay is not None:
            if _hooks["retrying"]:
                _fire("retrying", Job(self, job_id), error=error, delay=delay)
        elif status in TERMINAL and _hooks["finished"]:
            _fire("finished", Job(self, job_id), status=status,
                  error=None if status == "complete" else error, duration=duration)
        if ended is None:
            ended = self.storage.ended()
        for other, end, reason in ended if _hooks["finished"] else ():
            # A parent that ended with this step's outcome (its last subtask finished):
            # its own last step ran earlier, elsewhere perhaps, so no duration. Steps
            # this process holds get hooks of their own.
            if other != job_id and other not in self._claims:
                _fire("finished", Job(self, other), status=end,
                      error=None if end == "complete" else reason, duration=None)

    async def _aexecute(self, claim, timeout=None):
        """Run a claimed async step on the running loop and record its outcome;
        returns the job's new status. Storage calls go to threads, so the loop never
        waits for the database; a timeout cancels this step and no other."""
        try:
            function = _lookup_task(claim.name)
        except Error as exc:
            return await asyncio.to_thread(self._unregistered, claim, exc)
        context = Context(self, Job(self, claim.id), claim.attempts, function.atomic,
                          claim.token)
        reset = _current.set(context)
        began = time.monotonic()
        try:
            try:
                if _hooks["started"]:
                    _fire("started", context.job, attempt=claim.attempts)
                if function.atomic:  # opened first, so ctx.db never blocks the loop
                    context._began(await asyncio.to_thread(self.storage.begin_step))
                params, kwargs = loads(claim.args)
                value = function.func(*params, **kwargs)
                if inspect.isawaitable(value):
                    value = await _within(value, timeout)
                result, call = _outcome(value, claim.rest and loads(claim.rest))
                if call is not None:
                    await asyncio.to_thread(self._declare, call[0])
                try:
                    status, ended = await asyncio.to_thread(
                        lambda: (self.storage.step_succeeded(
                            claim.id, claim.token, (claim.queue, claim.name), result, call),
                            self.storage.ended()))
                    await context._aend_transaction(commit=True)
                except Exception as exc:  # the database refused it: this attempt failed
                    raise _Unsaved(exc) from None
            except Exception as exc:
                tb = "" if isinstance(exc, _TimedOut) else traceback.format_exc()
                await context._aend_transaction(commit=False)
                return await asyncio.to_thread(self._fail_attempt, function, claim, exc, tb,
                                               duration=time.monotonic() - began)
        finally:
            _current.reset(reset)
        if status is None:
            logger.warning("job %s lost its claim while running (its lease lapsed)", claim.id)
        self._step_ended(claim.id, status, None, time.monotonic() - began, ended=ended)
        return status

    def _fail_attempt(self, function, claim, exc, tb=None, error=None, duration=None):
        """Queue the step again if retries are left, else fail the job."""
        retry_delay = None
        if function and not isinstance(exc, Fatal) and claim.attempts <= function.retries:
            retry_delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else min(
                function.retry_delay * 2 ** (claim.attempts - 1), MAX_RETRY_DELAY)
        if error is None:
            error = (str(exc) if isinstance(exc, (Fatal, _Unsaved, _TimedOut))
                     else f"{type(exc).__name__}: {exc}")
        status = self.storage.step_failed(claim.id, claim.token, error,
                                          traceback.format_exc() if tb is None else tb,
                                          retry_delay)
        self._step_ended(claim.id, status, error, duration, retry_delay)
        return status

    def _fail_claim(self, job_id, token, message):
        """Fail the attempt of a step whose process was killed (retries apply)."""
        row = self.storage.job(job_id)
        function = None
        with contextlib.suppress(Error):
            function = _lookup_task(row["name"])
        claim = Claim(job_id, row["name"], None, None, row["attempts"], token, 0, 0, False,
                      row["queue"])
        return self._fail_attempt(function, claim, Error(message), tb="", error=message)

    def _save_finished(self):
        """Commit the deferred successes together: one transaction for a batch of steps.
        If the database refuses it, each is saved alone, so an outcome it cannot store
        fails only its own attempt."""
        finished, self._finished = self._finished, []
        if not finished:
            return
        try:
            statuses = self.storage.finish_steps(
                [(claim.id, claim.token, (claim.queue, claim.name), result, call)
                 for claim, result, call, _ in finished])
        except Exception:  # one by one: only an outcome the database refuses fails
            statuses = [self._save_one(*outcome) for outcome in finished]
        else:
            for (claim, _, _, took), status in zip(finished, statuses):
                self._step_ended(claim.id, status, None, took)
        for (claim, _, _, _), status in zip(finished, statuses):
            self._claims.pop(claim.id, None)
            if status is None:
                logger.warning("job %s lost its claim before its result was saved", claim.id)
        self.storage.changed()

    def _save_one(self, claim, result, call, took):
        try:
            status = self.storage.step_succeeded(claim.id, claim.token,
                                                 (claim.queue, claim.name), result, call)
        except Exception as exc:
            return self._fail_attempt(_registry.get(claim.name), claim, _Unsaved(exc), tb="",
                                      duration=took)
        self._step_ended(claim.id, status, None, took)
        return status

    def _drop_claims(self, keep=()):
        """Forget the steps this process holds (its database calls are failing): their
        leases lapse and the supervisor queues them again. Those in `keep` (async steps
        still running) stay ours: their leases are renewed once the database is back."""
        for job_id in list(self._claims):
            if job_id not in keep:
                self._claims.pop(job_id, None)
        self._finished.clear()

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
                except Error as exc:
                    if not self._closed.is_set():
                        logger.warning("could not renew leases: %s", exc)

    # Waiting.

    def _wait_until(self, predicate, timeout=None, job_id=None):
        """Wait for predicate() without a busy loop: woken at once by this process's
        commits and within milliseconds by others' (see Storage.wait_for_change). A
        wait for a job to finish is woken by the watcher's one query for all such."""
        deadline = None if timeout is None else time.monotonic() + timeout
        storage, failures, finished = self.storage, 0, None
        if job_id is not None and not storage.memory:
            finished = threading.Event()
            storage.watch_job(job_id, finished.set)
        try:
            while True:
                seen, looked = storage.changes, time.monotonic()
                try:
                    if predicate():
                        return True
                    failures = 0
                except _Unreachable as exc:  # a server restart: look again, ever more slowly
                    failures += 1
                    logger.warning("%s (trying again)", exc)
                    if deadline is not None and time.monotonic() + _backoff(failures) > deadline:
                        raise
                    time.sleep(_backoff(failures))
                    continue
                remaining = 1.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if finished is not None:  # and a look of our own each second, to be sure
                    if finished.wait(min(remaining, 1.0)):  # finished, then maybe retried
                        finished.clear()
                        storage.watch_job(job_id, finished.set)
                    continue
                storage.wait_for_change(seen, min(remaining, WAIT_POLL if storage.memory else 1.0))
                pause = looked + WAIT_POLL - time.monotonic()  # however busy the database is
                if pause > 0:
                    time.sleep(pause if deadline is None else
                               max(0.0, min(pause, deadline - time.monotonic())))
        finally:
            if finished is not None:
                storage.unwatch_job(job_id, finished.set)

    async def _await_finished(self, job_id, timeout):
        """Wait in the running event loop until the job is finished: no thread, no
        poll of its own (Storage.watch_job), so thousands of waiters cost little."""
        loop, deadline = asyncio.get_running_loop(), None
        if timeout is not None:
            deadline = loop.time() + _seconds(timeout, "timeout")
        while True:
            if self.storage.memory:  # one process, nothing to watch: look every WAIT_POLL
                if self.storage.job_field(job_id, "status") in TERMINAL:
                    return
                woken = asyncio.sleep(WAIT_POLL)
            else:
                future = loop.create_future()

                def wake(future=future):
                    with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                        loop.call_soon_threadsafe(_resolve, future)
                self.storage.watch_job(job_id, wake)
                woken = future
            try:
                await asyncio.wait_for(woken, None if deadline is None else
                                       max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise TimeoutError(f"job {job_id} is not finished after {timeout} s") from None
            finally:
                if not self.storage.memory:
                    self.storage.unwatch_job(job_id, wake)
            if not self.storage.memory:
                status = await asyncio.to_thread(self.storage.job_field, job_id, "status")
                if status in TERMINAL:
                    return

    async def aenqueue(self, task, **options):
        """`await q.aenqueue(...)`: enqueue() without blocking the event loop."""
        if inspect.iscoroutine(task):
            task.close()
            raise TypeError("aenqueue() takes a Task such as hello('world'), not a coroutine: "
                            "call the task, do not await it")
        return await asyncio.to_thread(self.enqueue, task, **options)

    # Raw payload queues.

    def put(self, queue_name, payload):
        """Add a JSON payload to a raw queue; returns the message id."""
        message_id = self.storage.put(_name(queue_name, "queue"), _dumps(payload, "payload"))
        self.storage.changed()
        return message_id

    def get(self, queue_name, timeout=0, visibility=30):
        """The next message of a raw queue, or None after `timeout` seconds. A message
        not acked within `visibility` seconds is delivered again."""
        queue_name = _name(queue_name, "queue")
        visibility = _seconds(visibility, "visibility")
        found = []

        def take():
            row = self.storage.get([queue_name], visibility)
            if row:
                found.append(Message(self, row[0], row[1], loads(row[2]), row[3]))
            return bool(row)
        self._wait_until(take, _seconds(timeout, "timeout"))
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
        _job_row(task, queue, None, None, None, None, None)  # bad tasks fail here
        next_run = cron.next(datetime.datetime.fromtimestamp(
            self.storage.clock(), datetime.timezone.utc)).timestamp()
        self.storage.save_schedule(_name(name, "name"), spec, dumps(task), tz, queue, next_run)

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
            now = self.storage.clock()
        elif isinstance(now, datetime.datetime):
            now = now.timestamp()  # a naive datetime is local time, as for enqueue(at=)
        after = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)

        def plan(entry):
            name, spec, call, tz, queue, next_run = entry
            try:
                cron = Cron(spec, tz)
                following = cron.next(after).timestamp()
                missed = cron.next(datetime.datetime.fromtimestamp(
                    next_run, datetime.timezone.utc)).timestamp() <= now
                row = _job_row(loads(call), queue, None, None, None, None, None)
            except (Error, ValueError, TypeError) as exc:  # not one broken entry stops the rest
                logger.error("cron entry %r cannot fire: %s", name, exc)
                return next_run, None, now + 60, None
            # One job stands for every missed fire time: it ran now.
            return next_run, row, following, now if missed else next_run
        jobs = [Job(self, job_id) for job_id in self.storage.fire_schedules(now, plan)]
        if jobs:
            self.storage.changed()
        for job in jobs if _hooks["enqueued"] else ():
            _fire("enqueued", job)
        return jobs


def _job_row(task, queue, priority, delay, at, ttl, unique, parent=None, parent_token=None):
    """The INSERT_JOB parameters for `task`; options default to the task's own. Every
    option is checked here, before anything is written."""
    if not isinstance(task, Task):
        if inspect.iscoroutine(task):
            task.close()  # never to be awaited: no "never awaited" warning
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
    row = (_name(queue, "queue"), _integer(priority, "priority"), call.name,
           _dumps_call(call))
    limit_key = function.limit_key(call) if function else None
    if rest or delay is not None or at is not None or ttl is not None or unique is not None \
            or parent is not None or limit_key is not None:
        at, delay = _due(delay, at)
        delayed = int(delay > 0 or (at is not None and at > time.time()))
        ttl = None if ttl is None else _seconds(ttl, "ttl")
        unique = None if unique is None else _name(unique, "unique")
        row += (at, delay, delayed, at, delay, ttl, _dumps(rest, "chain") if rest else None,
                unique, parent, parent_token, limit_key)
    return row


async def _within(awaitable, timeout):
    """Await an async step's coroutine; past `timeout` seconds, cancel it (it has
    CANCEL_GRACE seconds to yield before the supervisor kills its process)."""
    if not timeout:
        return await awaitable
    step = asyncio.ensure_future(awaitable)  # a task of its own, with this context
    done, _ = await asyncio.wait({step}, timeout=timeout)
    if not done:
        step.cancel()
        with contextlib.suppress(BaseException):
            await step
        raise _TimedOut(f"timed out after {timeout:g} s")
    return step.result()


class _TimedOut(Error):
    """An async step ran past its timeout and was cancelled."""


class _Unsaved(Error):
    """The database refused a finished step's outcome (inside `_execute`)."""

    def __init__(self, exc):
        super().__init__(f"could not save the step's outcome: {exc}")


def _valid_id(value):
    """A job id as the database stores it: an int of at most 64 bits."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"a job id is an int, not {type(value).__name__} {_short_repr(value)}")
    if not 0 < value < 2 ** 63:
        raise NotFound(f"no job {value}: job ids are from 1 to {2 ** 63 - 1}")
    return value


def _resolve(future):
    if not future.done():
        future.set_result(None)


def _due(delay, at):
    """(at, delay) for the INSERT: at an epoch time, or `delay` seconds from now."""
    if delay is not None and at is not None:
        raise TypeError("give delay= or at=, not both")
    if delay is not None:
        return None, max(_number(delay, "delay"), 0.0)
    if isinstance(at, datetime.datetime):
        return at.timestamp(), 0.0  # a naive datetime is local time, as timestamp() says
    return (None if at is None else _number(at, "at", "a datetime or an epoch time")), 0.0


def _dumps_call(call):
    """The stored form of a call's arguments; errors name `args[1]['when']` style paths."""
    if not call.args and not call.kwargs:
        return "[[],{}]"
    return "[%s,%s]" % (_dumps(call.args, "args"), _dumps(call.kwargs, "kwargs"))


def _outcome(value, rest):
    """What a step's return value means: (result JSON, None) when the job is done, or
    (None, (name, args JSON, rest JSON)) for the continuation to run next."""
    if inspect.iscoroutine(value):
        value.close()
        raise Fatal("the task returned a coroutine: call async tasks through litetq, "
                    "which awaits them") from None
    call, rest, value = _advance(value, rest or [])
    if call is None:
        try:
            return _dumps(value, "result"), None
        except (TypeError, ValueError) as exc:
            raise Fatal(str(exc)) from None
    function = _registry.get(call.name)  # the limits of the task it calls apply to it
    return None, (call.name, _dumps_call(call), _dumps(rest, "chain") if rest else None,
                  function.limit_key(call) if function else None)


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
        """The subtasks that count, oldest first: those spawned by attempts that
        succeeded (or still run), not those of an attempt that failed or was lost."""
        return [Job(self.queue, i) for i in self.queue.storage.children(self.id)]

    def logs(self):
        """This job's log lines and its subtasks', oldest first."""
        keys = ("time", "level", "message", "job_id")
        return [dict(zip(keys, row)) for row in self.queue.storage.logs(self.id)]

    def done(self):
        return self.status in TERMINAL

    def wait(self, timeout=None):
        """Block until the job is terminal; returns the job."""
        if timeout is not None:
            timeout = _seconds(timeout, "timeout")
        if not self.queue._wait_until(self.done, timeout, self.id):
            raise TimeoutError(f"job {self.id} is still {self.status} after {timeout} s")
        return self

    def result(self, timeout=None):
        """Block until terminal and return the final value, or raise what happened."""
        return self._final(self.wait(timeout).queue.storage.job(self.id))

    async def aresult(self, timeout=None):
        """`await job.aresult()`: result() without blocking the event loop. A job that
        has finished already answers at once: its end was heard of before we listened."""
        if timeout is not None:
            timeout = _seconds(timeout, "timeout")
        row = await asyncio.to_thread(self.queue.storage.job, self.id)
        if row["status"] not in TERMINAL:
            await self.queue._await_finished(self.id, timeout)
            row = await asyncio.to_thread(self.queue.storage.job, self.id)
        return self._final(row)

    def __await__(self):
        return self.aresult().__await__()

    def _final(self, row):
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
        self.queue.storage.changed()
        return changed

    def retry(self):
        """Queue a failed, cancelled or expired job again; True if it was one."""
        changed = self.queue.storage.retry(self.id)
        self.queue.storage.changed()
        return changed

    def to_dict(self):
        """Everything about the job as JSON-ready data (for the CLI and web page)."""
        return _job_info(self.queue.storage.job(self.id))


def _job_info(row):
    """A job row (a dict of storage's JOB_COLUMNS) as JSON-ready data."""
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
        self._queue.storage.nack(self.id, _seconds(delay, "delay"))
        self._queue.storage.changed()

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

    def __init__(self, queue=None, job=None, attempt=1, atomic=False, token=None):
        self.job, self.attempt = job, attempt
        self.last_progress = None
        self._queue, self._atomic, self._token = queue, atomic, token
        self._step = None  # (connection, token) of an atomic step's open transaction

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
            self._queue.storage.set_progress(self.job.id, _dumps([done, total], "progress"))

    def spawn(self, task, **options):
        """Enqueue a subtask: this job waits for it before it completes."""
        queue = self._need_queue("spawn")
        known = {"queue", "priority", "delay", "at", "ttl", "unique"}
        if set(options) - known:
            raise TypeError(f"spawn() got unknown options: {', '.join(set(options) - known)}")
        row = _job_row(task, **{k: options.get(k) for k in known}, parent=self.job.id,
                       parent_token=self._token)
        queue._declare(row[2])
        if self._atomic:
            self.db  # in the step's transaction: spawned if and only if the step commits
        job = Job(queue, queue.storage.insert_jobs([row])[0])
        queue.storage.changed()
        if _hooks["enqueued"]:  # in an atomic step, written in the step's transaction
            _fire("enqueued", job)
        return job

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
        if self._step is None:
            self._began(queue.storage.begin_step())
        return self._step[0]

    def _began(self, conn):
        """The atomic step's transaction is open on `conn`: this step's storage calls
        (log, spawn, its outcome) run in it, in this step's context only."""
        self._step = (conn, self._queue.storage.hold(conn))

    def _need_queue(self, what):
        if self._queue is None:
            raise RuntimeError(f"{what} needs a queue: it works in a job run by a worker "
                               f"or run_until_idle(), not under Task.run()")
        return self._queue

    def _end_transaction(self, commit):
        """End an atomic step's transaction, if it opened one. A commit that fails
        raises Error, having rolled back; a rollback never raises."""
        if self._step is not None:
            self._end(self._let_go(), commit)

    async def _aend_transaction(self, commit):
        if self._step is not None:
            await asyncio.to_thread(self._end, self._let_go(), commit)

    def _let_go(self):
        (conn, token), self._step = self._step, None
        self._queue.storage.unhold(token)  # in the step's own context
        return conn

    def _end(self, conn, commit):
        if commit:
            self._queue.storage.end_step(conn, True)
        else:
            with contextlib.suppress(Error):
                self._queue.storage.end_step(conn, False)


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
#
# A Worker is a supervisor and `concurrency` worker processes (or threads). Each
# one claims steps and runs them: sync steps on its own thread, one at a time;
# async steps on an event loop of its own thread, up to `async_concurrency` at
# once. It tells the supervisor in a shared array of slots (slot 0 for the sync
# step, 1.. for async ones) which step runs and until when it may, so the
# supervisor can kill a step past its timeout and recover the steps of a process
# that died. The supervisor also runs the cron table, requeues the steps of
# workers that vanished (their leases lapsed), applies retention and keeps the
# database tidy; it survives every database error: it logs it, waits and tries
# again.

TICK = 0.05  # seconds between the supervisor's checks of its processes
IDLE_WAIT = 0.1  # longest an idle worker process sleeps between looks for work (and stop)
SLOT_JOB, SLOT_TOKEN, SLOT_DEADLINE, SLOT_TIMEOUT = range(4)  # the fields of one slot
MAX_BATCH = 64  # steps a worker process claims at once when the queue is deep
BATCH_TIME = 0.005  # seconds of work a batch may hold before its results are committed
QUICK_STEP = 0.001  # seconds: a task usually this quick may have its result batched
MAX_BACKOFF = 5.0  # seconds, at most, between tries against a failing database
ASYNC_CONCURRENCY = 16  # async steps a worker process runs at once, by default
CANCEL_GRACE = 1.0  # seconds an async step past its timeout has to yield to cancellation
KEEP = {"complete": 86400.0, "failed": 7 * 86400.0, "cancelled": 7 * 86400.0,
        "expired": 7 * 86400.0}  # seconds finished jobs are kept, by status (None: forever)
RETAIN_BUDGET = 0.2  # seconds the supervisor spends deleting old jobs of a status, a second


def _import_modules(names):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise Error(f"cannot import {name!r}: {type(exc).__name__}: {exc}") from None


def _backoff(failures):
    """Seconds to wait after `failures` failures in a row: 0.1, 0.2, 0.4 ... 5."""
    return min(0.05 * 2 ** failures, MAX_BACKOFF)


class Worker:
    """Run steps from a database: `Worker(db).run()` is `python -m litetq worker DB`.

    `db` is a path, a URL or a Queue. By default `concurrency` worker processes (the
    CPU count) run the steps; with `threads=True`, threads of this process do, for
    web apps and tests (a step past its timeout is then marked failed, but cannot be
    killed). `.start()` returns at once and `.stop(grace=30)` stops as SIGTERM does;
    `with Worker(...)` does both. Signal handlers are installed only by `.run()` in the
    main thread. `django="mysite.settings"` (the CLI's --django) sets
    DJANGO_SETTINGS_MODULE and calls django.setup() in every process before it imports
    anything, so Django's tasks (see DjangoBackend) and the ORM work in steps.
    """

    def __init__(self, db, *, queues=None, concurrency=None, threads=False, imports=(),
                 burst=False, reload=False, cron=True, grace=30.0, lease=DEFAULT_LEASE,
                 async_concurrency=ASYNC_CONCURRENCY, keep=None, synchronous=None,
                 start_method=None, log_config=None, django=None):
        self.path = db.path if isinstance(db, Queue) else os.fspath(db)
        if isinstance(queues, str) or queues is not None and not all(
                isinstance(name, str) for name in queues):
            raise TypeError(f"queues must be a list of queue names, not {queues!r}")
        self.queues, self.imports, self.threads = list(queues or ()) or None, list(imports), threads
        self.concurrency = _integer(concurrency or os.cpu_count() or 1, "concurrency", 1, 256)
        self.async_concurrency = _integer(async_concurrency, "async_concurrency", 1, 1024)
        self.grace, self.lease = _seconds(grace, "grace"), _seconds(lease, "lease", True)
        self.burst, self.reload, self.cron, self.synchronous = burst, reload, cron, synchronous
        self.keep = {**KEEP, **(keep or {})}
        self.context = multiprocessing.get_context(start_method)
        self.log_config, self.django = log_config, django
        self.signals = 0  # set by the signal handlers and stop(), read by the loop
        self.children, self._thread, self._ticks = [], None, 0

    def __repr__(self):
        return f"<litetq.Worker {_shown(self.path)!r}>"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop(self.grace)

    def start(self):
        """Run in a thread of this process; returns the worker at once."""
        if self._thread is not None:
            raise RuntimeError("this worker was started already")
        self._started, self._failed = threading.Event(), None
        self._thread = threading.Thread(target=self._run_quietly, name="litetq-worker",
                                        daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failed is not None:
            raise self._failed
        return self

    def _run_quietly(self):
        try:
            self._main()
        except BaseException as exc:  # start() raises what stopped it from starting
            self._failed = exc
            logger.exception("worker %s stopped", _shown(self.path))
        finally:
            self._started.set()

    def stop(self, grace=30.0):
        """Stop as SIGTERM would: running steps get `grace` seconds to finish, the
        rest are queued again uncounted. Returns once the worker has stopped."""
        self.grace = _seconds(grace, "grace")
        self.signals += 1
        if self._thread is not None:
            self._thread.join()

    def run(self):
        """Supervise until a signal (or, with burst, until nothing is due); returns 0."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        if self._main() and self.reload:
            logger.info("source changed: restarting")
            os.execv(sys.executable, [sys.executable, "-m", "litetq", *sys.argv[1:]])
        return 0

    def _on_signal(self, signum, frame):
        self.signals += 1  # only a flag: logging or I/O here can deadlock

    def _main(self):
        """The supervisor; returns True when a source change asks for a restart."""
        if self.django:
            _django_setup(self.django)
        _import_modules(self.imports)
        self.queue = Queue(self.path, self.synchronous, lease=self.lease)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        watched = self._watched_files() if self.reload else {}
        self._until_done(self._register)
        self.stop_event = threading.Event() if self.threads else self.context.Event()
        size = 4 * (1 + self.async_concurrency)
        self.children = [_Child(n, [0.0] * size if self.threads else
                                self.context.Array("d", size, lock=False))
                         for n in range(self.concurrency)]
        for child in self.children:
            self._start(child)
        logger.info("worker %s: %d %s on %s, queues %s", self.worker_id, self.concurrency,
                    "threads" if self.threads else "processes", self.queue.storage.name,
                    ",".join(self.queues or ["all"]))
        if getattr(self, "_started", None):
            self._started.set()
        try:
            return self._supervise(watched)
        finally:
            self._shut_down()

    def _register(self):
        storage = self.queue.storage
        storage.register_worker(self.worker_id, ",".join(self.queues or ["*"]),
                                self.concurrency)
        for function in list(_registry.values()):  # what it imported decides the limits
            storage.declare_limits(function.name, *function.limits)
        for spec, name, tz, queue, function in _periodic:
            self.queue.schedule(name, spec, function(), tz=tz, queue=queue)

    def _until_done(self, action):
        """Run `action` until the database lets it, or a signal comes."""
        failures = 0
        while not self.signals:
            try:
                return action()
            except Error as exc:
                failures += 1
                logger.warning("supervisor: %s (trying again)", exc)
                time.sleep(_backoff(failures))

    def _supervise(self, watched):
        """The loop; returns True when a source change asks for a restart."""
        next_second, idle_ticks, failures = 0.0, 0, 0
        while not self.signals:
            time.sleep(TICK if not failures else _backoff(failures))
            try:
                self._check_children()
                self.queue.storage.maintain()
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
                failures = 0
            except Error as exc:  # a full disk, a lock held too long, a server away
                failures += 1
                logger.warning("supervisor: %s (trying again in %.1f s)", exc,
                               _backoff(failures))
        logger.info("stopping: running steps have %g s to finish", self.grace)
        return False

    def _every_second(self):
        storage = self.queue.storage
        storage.heartbeat(self.worker_id)
        storage.reap()
        storage.fold_counts()
        if self.cron:
            for job in self.queue.fire_due():
                logger.info("cron: enqueued job %s %r", job.id, job.task)
        self._ticks += 1
        if self._ticks % 5 == 0:
            storage.free_held()
        for status, keep in self.keep.items():
            if keep is not None:
                deleted = storage.purge(status, keep, budget=RETAIN_BUDGET)
                if deleted:
                    logger.info("retention: deleted %d jobs of %s trees", deleted, status)
        if self._ticks % 60 == 0:
            storage.forget_workers(7 * 86400)

    def _idle(self):
        """Burst mode: nothing due in our queues and none of our workers busy."""
        workers = [child.worker_id for child in self.children if child.runner is not None]
        return not self.queue.storage.has_work(self.queues, workers) and not self._messages_due()

    def _messages_due(self):
        names = [name for name in _consumers if not self.queues or name in self.queues]
        return bool(names) and self.queue.storage.messages_due(names)

    def _start(self, child):
        for index in range(0, len(child.slots), 4):
            child.slots[index + SLOT_JOB] = 0
        if self.threads:
            child.runner = threading.Thread(
                target=_worker_thread, name=f"litetq-worker-{child.number}", daemon=True,
                args=(self, child))
            child.worker_id = f"{self.worker_id}/{child.number}"
        else:
            child.runner = self.context.Process(
                target=_worker_process, name="litetq-worker", daemon=True,
                args=(self.path, self.synchronous, self.queues, self.imports, self.lease,
                      self.async_concurrency, child.slots, self.stop_event, os.getpid(),
                      self.log_config, self.django))
        child.runner.start()
        if not self.threads:  # as _worker_process names itself: "<our id>/<its pid>"
            child.worker_id = f"{self.worker_id}/{child.runner.pid}"
        child.started = time.monotonic()

    def _check_children(self):
        """Replace dead processes and kill overdue steps. A step whose process died is
        run again, uncounted (its third loss fails it); a timed-out step has failed an
        attempt, and its retries apply; the other steps of a process killed for one
        are recovered as after any death. A process that keeps dying as it starts is
        started again ever more slowly, up to every MAX_BACKOFF seconds."""
        now = time.monotonic()
        for child in self.children:
            if child.runner is None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            if not child.runner.is_alive():
                self._recover(child, None, _exit_message(getattr(child.runner, "exitcode", 0)))
                continue
            for index, job_id, token, deadline, timeout in child.steps():
                if deadline and now > deadline:
                    message = f"timed out after {timeout:g} s"
                    if self.threads:  # no killing a thread: its outcome will not count
                        child.slots[index + SLOT_DEADLINE] = 0
                        self._log_step(job_id, self.queue._fail_claim(job_id, token, message))
                    else:
                        child.runner.kill()
                        child.runner.join()
                        self._recover(child, index, message)
                    break

    def _recover(self, child, overdue, message):
        """A process died, or was killed for the step in slot `overdue`: that step's
        attempt failed; its other steps are lost (run again uncounted); a new process
        takes its place, at once unless it died young."""
        dead = child.worker_id
        for index, job_id, token, _, _ in child.steps():
            child.slots[index + SLOT_JOB] = 0
            if index == overdue:
                self._log_step(job_id, self.queue._fail_claim(job_id, token, message))
            else:
                self._log_step(job_id, self.queue.storage.lose(
                    job_id, token, message if overdue is None else
                    f"lost with its worker process, killed for a step past its timeout"))
        child.runner = None
        quick = time.monotonic() - child.started < 1.0
        child.quick_deaths = child.quick_deaths + 1 if quick and overdue is None else 0
        child.restart_at = time.monotonic() + (_backoff(child.quick_deaths)
                                               if child.quick_deaths else 0)
        if child.quick_deaths:
            logger.warning("worker %s died %.1f s after it started; the next starts in %.1f s",
                           child.worker_id, time.monotonic() - child.started,
                           child.restart_at - time.monotonic())
        else:
            self._start(child)
        self.queue.storage.release(dead)

    def _log_step(self, job_id, status):
        """The log line of a step that ended with its process."""
        if status is None:  # it had finished after all
            return
        row = self.queue.storage.job(job_id)
        logger.warning("job %s %s: %s (%s)", job_id, row["name"], status, row["error"])
        self.queue.storage.changed()

    def _shut_down(self):
        """Let running steps finish within the grace period, then requeue the rest."""
        self.stop_event.set()
        runners = [child.runner for child in self.children if child.runner is not None]
        deadline = time.monotonic() + self.grace
        while any(runner.is_alive() for runner in runners) and self.signals < 2:
            if time.monotonic() > deadline:
                break
            time.sleep(TICK)
        for child in self.children:
            runner = child.runner
            if runner is not None and runner.is_alive() and not self.threads:
                runner.kill()
                runner.join()
                for _, job_id, _, _, _ in child.steps():
                    logger.info("job %d: requeued (worker stopping)", job_id)
            if runner is not None:
                with contextlib.suppress(Error):
                    self.queue.storage.release(child.worker_id)
        with contextlib.suppress(Error):
            self.queue.storage.unregister_worker(self.worker_id)
        self.queue.close()

    def _watched_files(self):
        """Modification times of the source files of the modules we imported."""
        times = {}
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if path and not path.startswith((sys.prefix, sys.base_prefix)):
                with contextlib.suppress(OSError):
                    times[path] = os.stat(path).st_mtime
        return times


class _Child:
    """A worker process (or thread) the supervisor runs, and its slots: four numbers
    per step it runs, slot 0 for its sync step and one per async step."""

    def __init__(self, number, slots):
        self.number, self.slots, self.runner, self.worker_id = number, slots, None, None
        self.started, self.quick_deaths, self.restart_at = 0.0, 0, 0.0

    def steps(self):
        """(slot index, job id, token, deadline, timeout) of each step it runs."""
        slots = self.slots
        return [(index, int(slots[index + SLOT_JOB]), int(slots[index + SLOT_TOKEN]),
                 slots[index + SLOT_DEADLINE], slots[index + SLOT_TIMEOUT])
                for index in range(0, len(slots), 4) if slots[index + SLOT_JOB]]


def _exit_message(code):
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"worker process killed by signal {-code} ({signal.Signals(-code).name})"
    return f"worker process died with exit code {code}"


def _worker_process(path, synchronous, queues, imports, lease, async_concurrency, slots,
                    stop, supervisor, log_config, django):
    """A worker process, until told to stop or orphaned."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the supervisor decides when we stop
        signal.signal(sig, signal.SIG_IGN)
    if log_config and multiprocessing.get_start_method() != "fork":
        _configure_logging(*log_config)
    if django:
        _django_setup(django)
    _import_modules(imports)
    queue = Queue(path, synchronous, lease=lease)
    # The supervisor's id in ours tells which worker holds the steps we claim.
    queue._worker_id = (os.getpid(), f"{socket.gethostname()}:{supervisor}/{os.getpid()}")
    _worker_loop(queue, queues, slots, stop, lambda: os.getppid() == supervisor,
                 async_concurrency)


def _worker_thread(worker, child):
    """A worker thread (Worker(threads=True)): a queue of its own, sharing the process."""
    queue = Queue(worker.path, worker.synchronous, lease=worker.lease)
    queue._worker_id = (os.getpid(), child.worker_id)
    _worker_loop(queue, worker.queues, child.slots, worker.stop_event, lambda: True,
                 worker.async_concurrency)


def _worker_loop(queue, queues, slots, stop, alive, async_concurrency):
    """Claim steps and run them, until told to stop. A failing database (full, locked
    too long, away) makes it wait and try again, never exit."""
    storage, batch, busy, failures = queue.storage, 1, False, 0
    steps = _Steps(queue, slots, async_concurrency)
    try:
        while not stop.is_set() and alive():
            try:
                seen = storage.changes
                limit = steps.claim_limit(batch)
                if not limit:  # every async slot taken: claim nothing until one frees
                    steps.wait_for_room(IDLE_WAIT)
                    continue
                # Look before claiming: the claim takes SQLite's write lock, the look not.
                wait = 0.0 if busy else storage.next_work(queues)
                claims = queue._claim(queues, limit) if wait == 0.0 else []
                busy = len(claims) == limit
                if claims:
                    batch = steps.run_batch(claims, batch, stop)
                elif not queue._consume_one(queues):
                    storage.wait_for_change(seen, IDLE_WAIT if not wait else min(wait, IDLE_WAIT))
                failures = 0
            except Exception as exc:  # a database error: its steps' leases lapse; wait, go on
                failures, busy, slots[SLOT_JOB] = failures + 1, False, 0
                queue._drop_claims(keep=steps.async_claims())
                logger.warning("worker: %s (trying again in %.1f s)",
                               exc if isinstance(exc, Error) else f"{type(exc).__name__}: {exc}",
                               _backoff(failures))
                stop.wait(_backoff(failures))
    finally:
        steps.close()  # lets running async steps finish: the supervisor minds the grace
        queue.close()


class _Steps:
    """What a worker process runs: sync steps here, one at a time, with their results
    committed together while they are quick; async steps on an event loop of their
    own thread, started when the first one comes, each with a slot of its own."""

    def __init__(self, queue, slots, async_concurrency):
        self.queue, self.slots, self.capacity = queue, slots, async_concurrency
        self.loop = None
        self.async_running = 0
        self.running = set()  # job ids of the async steps on the loop
        self.room = threading.Condition()
        self._registered, self._async_known = -1, False

    def claim_limit(self, batch):
        """How many steps to claim now. A claimed step is run at once, never kept
        waiting here (its lease ticking, out of other workers' reach): while an async
        task is known, no more than the free async slots, one at a time beside running
        async steps, and none while every slot is taken."""
        free = self.capacity - self.async_running
        if self.async_running:
            return min(1, free)
        if len(_registry) != self._registered:  # tasks registered (or imported) since
            self._registered = len(_registry)
            self._async_known = any(f.is_async for f in list(_registry.values()))
        return min(batch, free) if self._async_known else batch

    def wait_for_room(self, timeout):
        """Block until an async slot is free, or `timeout` seconds pass."""
        with self.room:
            if self.async_running >= self.capacity:
                self.room.wait(timeout)

    def async_claims(self):
        """Ids of the async steps running on the loop."""
        with self.room:
            return set(self.running)

    def run_batch(self, claims, batch, stop):
        """Run claimed steps; returns the next batch size: doubled while the queue is
        deep and steps are quick, so one transaction claims many steps, never more
        than BATCH_TIME of work."""
        queue, started = self.queue, time.monotonic()
        for claim in claims:
            queue._claims[claim.id] = claim.token
        queue._keep_leases()  # async steps' too: they may outlast a lease many times
        functions = {}
        for claim in claims:
            functions[claim.id] = None
            with contextlib.suppress(Error):  # an unknown task fails when it runs
                functions[claim.id] = _lookup_task(claim.name)
        # The async steps go to the loop first: none waits here behind a slow sync step.
        claims = sorted(claims, key=lambda claim: not getattr(functions[claim.id],
                                                              "is_async", False))
        try:
            for done, claim in enumerate(claims):
                if stop.is_set():  # shutting down: give back the steps not begun
                    for unbegun in claims[done:]:
                        queue.storage.requeue(unbegun.id, unbegun.token)
                        queue._claims.pop(unbegun.id, None)
                    break
                function = functions[claim.id]
                if function is not None and function.is_async:
                    if not self._start_async(claim, function):  # a task claim_limit()
                        queue.storage.requeue(claim.id, claim.token)  # did not know of
                        queue._claims.pop(claim.id, None)
                else:
                    self._run_sync(claim, function)
        finally:
            queue._save_finished()
        if len(claims) < batch:  # the queue ran dry
            return len(claims)
        per_step = (time.monotonic() - started) / len(claims)
        return max(1, min(batch * 2, MAX_BATCH, int(BATCH_TIME / per_step)))

    def _run_sync(self, claim, function):
        """Run a claimed step here, telling the supervisor what runs until when."""
        queue, name, slots = self.queue, claim.name, self.slots
        timeout = function.timeout if function and function.timeout else 0
        expected = queue._durations.get(name)
        # Results wait for the batch's commit only behind steps known to be quick, and
        # never behind a step that may be killed.
        if timeout or expected is None or expected > QUICK_STEP:
            queue._save_finished()
        started = time.monotonic()
        slots[SLOT_TOKEN], slots[SLOT_TIMEOUT] = claim.token, timeout
        slots[SLOT_DEADLINE] = started + timeout if timeout else 0
        slots[SLOT_JOB] = claim.id
        if _django_ready:  # --django: stale connections closed around steps, as requests
            _django_close()
        status = queue._run_step(claim, defer=True)
        if _django_ready:
            _django_close()
        slots[SLOT_JOB] = 0
        took = time.monotonic() - started
        queue._durations[name] = took if expected is None else 0.8 * expected + 0.2 * took
        logger.info("job %s %s: %s in %.1f ms", claim.id, name, status, took * 1000)

    def _start_async(self, claim, function):
        """Hand a claimed async step to the event loop; False if every slot is taken
        (the async task was unknown when the batch was claimed: it goes back)."""
        with self.room:
            if self.async_running >= self.capacity:
                return False
            self.async_running += 1
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.executor = concurrent.futures.ThreadPoolExecutor(  # their storage calls
                self.capacity + 2, "litetq-step")
            self.loop.set_default_executor(self.executor)
            threading.Thread(target=self.loop.run_forever, name="litetq-loop",
                             daemon=True).start()
        index = next(index for index in range(4, len(self.slots), 4)
                     if not self.slots[index + SLOT_JOB])
        timeout = function.timeout or 0
        slots = self.slots
        slots[index + SLOT_TOKEN], slots[index + SLOT_TIMEOUT] = claim.token, timeout
        slots[index + SLOT_DEADLINE] = time.monotonic() + timeout + CANCEL_GRACE if timeout else 0
        slots[index + SLOT_JOB] = claim.id
        with self.room:
            self.running.add(claim.id)
        asyncio.run_coroutine_threadsafe(self._run_async(claim, index, timeout), self.loop)
        return True

    async def _run_async(self, claim, index, timeout):
        started = time.monotonic()
        try:
            status = await self.queue._aexecute(claim, timeout)
            logger.info("job %s %s: %s in %.1f ms", claim.id, claim.name, status,
                        (time.monotonic() - started) * 1000)
        except Exception:  # the database failed: the lease lapses, the step runs again
            logger.exception("job %s %s: its outcome could not be saved", claim.id,
                             claim.name)
        finally:
            self.slots[index + SLOT_JOB] = 0
            self.queue._claims.pop(claim.id, None)
            self.queue.storage.changed()
            with self.room:
                self.running.discard(claim.id)
                self.async_running -= 1
                self.room.notify_all()

    def close(self):
        """Wait for the running async steps (the supervisor kills us past the grace)."""
        with self.room:
            while self.async_running:
                self.room.wait()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.executor.shutdown(wait=False)


# --- Django ------------------------------------------------------------------
#
# Django's task framework (django.tasks in Django 6, the django-tasks backport
# before it) enqueues into litetq through DjangoBackend. A Django task call is a
# job of the built-in task litetq.django (litetq.django_async for an async
# function) whose arguments are the Django task's module path, its args, kwargs
# and options; the job id is the TaskResult id. What Django wants to know about
# each attempt (which worker ran it, what it raised) is kept on the job as log
# lines, so get_result() reads it from the database like everything else. Django
# is imported only here, and only when used: `import litetq` never loads it, and
# the backend class is made on first access of `litetq.DjangoBackend`.

DJANGO, DJANGO_ASYNC = "litetq.django", "litetq.django_async"
DJANGO_ATTEMPT = re.compile(r"django: attempt on worker (.+)")  # log lines: one per attempt
DJANGO_RAISED = re.compile(r"django: raised (\S+)\n(.*)", re.DOTALL)  # and one per failure
_django_queues = {}  # database -> the Queue that DjangoBackends of this process share
_django_lock = threading.Lock()
_django_ready = False  # True in a worker process that set Django up (--django)


def __getattr__(name):
    """`litetq.DjangoBackend`, made (importing Django) on its first access."""
    if name == "DjangoBackend":
        try:
            backend = globals()["DjangoBackend"] = _make_django_backend()
        except AttributeError as exc:  # not "no such attribute": a Django we do not know
            raise ImportError(f"cannot make litetq.DjangoBackend: {exc}") from exc
        return backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _django():
    """Django's task framework: django.tasks where Django has it, else the backport."""
    try:
        from django.tasks import base, exceptions, signals
        from django.tasks.backends.base import BaseTaskBackend
        from django.utils.json import normalize_json
    except ImportError:
        try:
            from django_tasks import base, exceptions, signals
            from django_tasks.backends.base import BaseTaskBackend
            from django_tasks.utils import normalize_json
        except ImportError:
            raise ImportError("litetq.DjangoBackend needs Django 6, or an older Django with "
                              "the django-tasks backport: pip install 'litetq[django]'") from None
    return types.SimpleNamespace(
        Task=base.Task, TaskResult=base.TaskResult, Status=base.TaskResultStatus,
        TaskContext=base.TaskContext, TaskError=base.TaskError,
        BaseTaskBackend=BaseTaskBackend, DoesNotExist=exceptions.TaskResultDoesNotExist,
        normalize_json=normalize_json, enqueued=signals.task_enqueued,
        started=signals.task_started, finished=signals.task_finished)


def _make_django_backend():
    from django.core.exceptions import ImproperlyConfigured
    d = _django()

    class DjangoBackend(d.BaseTaskBackend):
        """Django's task backend on a litetq database:
        `TASKS = {"default": {"BACKEND": "litetq.DjangoBackend",
        "OPTIONS": {"database": "app.sqlite"}}}` (a path or a postgresql:// URL);
        `python -m litetq worker DB --django mysite.settings` runs the tasks."""

        supports_defer = True  # run_after
        supports_async_task = True  # run on the worker's event loop
        supports_get_result = True  # from any process, as the job is in the database
        supports_priority = True

        def __init__(self, alias, params):
            super().__init__(alias, params)
            unknown = set(self.options) - {"database"}
            if unknown:
                raise ImproperlyConfigured(f"TASKS[{alias!r}]: litetq.DjangoBackend takes the "
                                           f"OPTIONS 'database', not {', '.join(sorted(unknown))}")
            database = self.options.get("database") or os.environ.get("LITETQ_DB")
            if not isinstance(database, (str, os.PathLike)) or not database:
                raise ImproperlyConfigured(
                    f"TASKS[{alias!r}]: litetq.DjangoBackend needs OPTIONS = {{'database': "
                    f"'app.sqlite'}} (a path or a postgresql:// URL), or $LITETQ_DB")
            self.database = os.fspath(database)

        @property
        def queue(self):
            """The litetq Queue on the database, one per process and database."""
            with _django_lock:
                if self.database not in _django_queues:
                    _django_queues[self.database] = Queue(self.database)
                return _django_queues[self.database]

        def enqueue(self, task, args, kwargs):
            self.validate_task(task)
            args, kwargs = list(args), dict(kwargs)
            for value, where in ((args, "args"), (kwargs, "kwargs")):
                try:
                    _dumps(value, where)
                    d.normalize_json(value)  # as Django's TaskResult will: no litetq Tasks
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{task.module_path}: {exc}") from None
            options = {"backend": self.alias, "queue_name": task.queue_name,
                       "priority": task.priority,
                       "run_after": task.run_after and task.run_after.isoformat()}
            name = DJANGO_ASYNC if inspect.iscoroutinefunction(task.func) else DJANGO
            # Django's priorities (-100 to 100, higher first, default 0) are litetq's
            # as they are: the same order, and plain litetq jobs (default 0) sit in the
            # middle of them.
            job = self.queue.enqueue(Task(name, (task.module_path, args, kwargs, options)),
                                     queue=task.queue_name, priority=task.priority,
                                     at=task.run_after)
            result = _django_result(self.queue, job.id, task)
            d.enqueued.send(type(self), task_result=result)
            return result

        def get_result(self, result_id):
            try:
                job_id = _valid_id(result_id)
                return _django_result(self.queue, job_id)
            except (TypeError, NotFound):
                raise d.DoesNotExist(f"no task result {result_id!r} in {self.database}") \
                    from None

    DjangoBackend.__module__ = __name__
    return DjangoBackend


def _django_task(path, options):
    """The Django task at `path` with the options it was enqueued with; only objects
    made by Django's @task are ever run."""
    from django.utils.module_loading import import_string
    task = import_string(path)
    if not isinstance(task, _django().Task):
        raise Error(f"{path} is not a Django task (decorate it with @task)")
    run_after = options.get("run_after")
    return task.using(priority=options["priority"], queue_name=options["queue_name"],
                      backend=options["backend"],
                      run_after=run_after and datetime.datetime.fromisoformat(run_after))


def _django_time(epoch):
    """A stored epoch time as Django wants it: aware in UTC, or naive local with USE_TZ off."""
    if epoch is None:
        return None
    from django.conf import settings
    from django.utils import timezone
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment if settings.USE_TZ else timezone.make_naive(moment)


def _django_result(queue, job_id, task=None):
    """The TaskResult of the Django task that job `job_id` runs; NotFound for a job that
    runs something else. Worker ids and errors come from the job's own log lines, one
    per attempt, and from how the job ended when no attempt said."""
    d, row = _django(), queue.storage.job(job_id)
    if row["name"] not in (DJANGO, DJANGO_ASYNC):
        raise NotFound(f"job {job_id} is not a Django task")
    path, args, kwargs, options = loads(row["args"])[0]
    attempts, errors, failed_last = [], [], False
    for when, _, message, owner in queue.storage.logs(job_id):
        if owner != job_id:
            continue
        if match := DJANGO_ATTEMPT.fullmatch(message):
            attempts.append((when, match[1]))
            failed_last = False
        elif match := DJANGO_RAISED.fullmatch(message):
            errors.append(d.TaskError(exception_class_path=match[1], traceback=match[2]))
            failed_last = True
    status = row["status"]
    if status in ("failed", "cancelled", "expired") and not failed_last:
        # It ended without a word from the task: a lost worker, a cancel, its ttl.
        kind = {"failed": "TaskFailed", "cancelled": "Cancelled", "expired": "Expired"}[status]
        errors.append(d.TaskError(exception_class_path=f"litetq.{kind}",
                                  traceback=row["traceback"] or row["error"] or status))
    result = d.TaskResult(
        task=task or _django_task(path, options), id=str(job_id),
        status=d.Status.READY if status == "queued" else d.Status.RUNNING
        if status in UNFINISHED else d.Status.SUCCESSFUL if status == "complete"
        else d.Status.FAILED,
        enqueued_at=_django_time(row["created"]),
        started_at=_django_time(attempts[0][0] if attempts else row["started"]),
        last_attempted_at=_django_time(attempts[-1][0] if attempts else row["started"]),
        finished_at=_django_time(row["finished"] if status in TERMINAL else None),
        args=args, kwargs=kwargs, backend=options["backend"], errors=errors,
        worker_ids=[worker for _, worker in attempts])
    if status == "complete" and row["result"] is not None:
        object.__setattr__(result, "_return_value", loads(row["result"]))
    return result


def _django_begin(context, path, options):
    """An attempt starts: the step's (task, TaskResult), its attempt recorded on the job
    and task_started sent."""
    queue = context._need_queue("a Django task")  # which records its attempts on the job
    task = _django_task(path, options)
    queue.storage.add_log(context.job.id, "debug", f"django: attempt on worker "
                                                   f"{queue.worker_id}")
    result = _django_result(queue, context.job.id, task)
    _django().started.send(type(task.get_backend()), task_result=result)
    return task, result


def _django_call(task, result, args, kwargs):
    """Call the Django task's function (a coroutine function returns its coroutine)."""
    if task.takes_context:
        return task.func(_django().TaskContext(task_result=result), *args, **kwargs)
    return task.func(*args, **kwargs)


def _django_value(value):
    """A Django task's return value as Django normalises it; TypeError if not JSON."""
    value = _django().normalize_json(value)
    _dumps(value, "the return value")
    return value


def _django_end(context, task, result, exc=None, value=None):
    """An attempt ended: what it raised recorded on the job, and task_finished sent."""
    d, now = _django(), datetime.datetime.now(datetime.timezone.utc)
    if exc is not None:
        path = f"{type(exc).__module__}.{type(exc).__qualname__}"
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error = d.TaskError(exception_class_path=path, traceback=text)
        object.__setattr__(result, "errors", [*result.errors, error])
        context._queue.storage.add_log(context.job.id, "error",
                                       f"django: raised {path}\n{text}")
    else:
        object.__setattr__(result, "_return_value", value)
    object.__setattr__(result, "status", d.Status.FAILED if exc else d.Status.SUCCESSFUL)
    object.__setattr__(result, "finished_at", _django_time(now.timestamp()))
    d.finished.send(type(task.get_backend()), task_result=result)


@task(name=DJANGO)
def _django_step(path, args, kwargs, options):
    """Run a Django task enqueued through litetq.DjangoBackend (a sync function)."""
    context = current()
    task, result = _django_begin(context, path, options)
    try:
        value = _django_value(_django_call(task, result, args, kwargs))
    except Exception as exc:
        _django_end(context, task, result, exc)
        raise
    _django_end(context, task, result, value=value)
    return value


@task(name=DJANGO_ASYNC)
async def _django_astep(path, args, kwargs, options):
    """Run an async Django task on the worker's event loop; the Django bookkeeping on
    Django's thread for sync code, where its ORM keeps the connections that async code
    uses, closed there when stale before and after the task, as around a request."""
    from asgiref.sync import sync_to_async
    context = current()
    await sync_to_async(_django_close)()
    try:
        task, result = await sync_to_async(_django_begin)(context, path, options)
        try:
            value = _django_value(await _django_call(task, result, args, kwargs))
        except Exception as exc:
            await sync_to_async(_django_end)(context, task, result, exc)
            raise
        await sync_to_async(_django_end)(context, task, result, value=value)
        return value
    finally:
        await sync_to_async(_django_close)()


def _django_close():
    """Close this thread's Django database connections that are broken or past their
    CONN_MAX_AGE, as Django does before and after each request."""
    from django.db import close_old_connections
    close_old_connections()


def _django_setup(settings):
    """Set up Django with this settings module (the worker's --django), before the
    modules of tasks are imported."""
    global _django_ready
    os.environ["DJANGO_SETTINGS_MODULE"] = settings
    try:
        import django
        django.setup()
    except Exception as exc:
        raise Error(f"cannot set up Django with settings {settings!r}: "
                    f"{type(exc).__name__}: {exc}") from None
    _django_ready = True


# --- The web page ------------------------------------------------------------
#
# `python -m litetq web DB` serves one self-contained page and a small JSON
# API with http.server. The page itself is static: all job data reaches it as
# JSON and goes into the DOM as text nodes, so nothing a task stored (args,
# errors, log lines, queue names) is ever parsed as HTML.

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
    cls = _WebServer6 if ":" in host else _WebServer
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


class _WebServer(http.server.ThreadingHTTPServer):
    request_queue_size = 256  # connections the kernel holds while every thread is busy
    daemon_threads = True


class _WebServer6(_WebServer):
    address_family = socket.AF_INET6


def _is_digits(text):
    # str.isdigit() alone also accepts "²" and other non-ASCII digits.
    return text.isascii() and text.isdigit()


# JSON API: each route maps (method, path pattern) to a function
# f(queue, query, *groups) returning a JSON-ready value.

def _api_stats(queue, query):
    _query_params(query, ())
    return queue.stats()


def _api_queues(queue, query):
    """Every queue with jobs or a pause: its counts per status and whether it is paused."""
    _query_params(query, ())
    stats, paused = queue.stats(), queue.paused()
    return {"queues": [
        {"name": name, "paused": name in paused,
         "counts": {status: stats.get(name, {}).get(status, 0) for status in STATUSES}}
        for name in sorted(set(stats) | paused)]}


def _api_jobs(queue, query):
    """A page of jobs, newest first, and the `before` that asks for the next one."""
    params = _query_params(query, _WEB_FILTERS + ("limit", "before"))
    limit = _int_param(params.get("limit", "100"), "limit", 1, _WEB_MAX_LIMIT)
    before = params.get("before")
    before = None if before is None else _int_param(before, "before", 1, NO_LIMIT)
    rows, more = queue.storage.find_jobs(**_job_filters(params), before=before, limit=limit)
    return {"jobs": [_job_info(row) for row in rows], "next_before": more}


def _api_jobs_action(queue, query, action):
    """POST /api/jobs/retry|cancel: every job the filters match whose state allows it."""
    filters = _job_filters(_query_params(query, _WEB_FILTERS))
    count = queue.storage.act_on_jobs(action, **filters)
    queue.storage.changed()
    return {"count": count}


def _job_filters(params):
    """The jobs list's filters, checked, as keywords of Storage.find_jobs()."""
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise _WebError(400, f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
    filters = {"status": status}
    for param, key in (("queue", "queue"), ("task", "name"), ("q", "search")):
        value = params.get(param)
        if value is not None and (len(value) > 1000 or "\0" in value):
            raise _WebError(400, f"{param} must be at most 1000 characters, without NUL")
        filters[key] = value
    return filters


def _api_job(queue, query, job_id):
    _query_params(query, ())
    return _job_detail(queue.job(_job_id(job_id)))


def _api_action(queue, query, job_id, action):
    """POST /api/jobs/ID/retry|cancel: answer 409 when the state forbids it."""
    _query_params(query, ())
    job = queue.job(_job_id(job_id))
    status = job.status
    if action == "retry" and status not in RETRYABLE:
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


def _api_pause(queue, query, name, action):
    """POST /api/queues/NAME/pause|resume."""
    _query_params(query, ())
    name = _path_name(name, "queue name")
    getattr(queue, action)(name)
    return {"name": name, "paused": action == "pause"}


def _api_schedules(queue, query):
    _query_params(query, ())
    return [dict(entry, task=repr(entry["task"])) for entry in queue.schedules()]


# Observability (SPEC section 15): Prometheus metrics, the live workers, the chart.

class _WebText(collections.namedtuple("_WebText", "body ctype")):
    """A route's answer that is not JSON."""


_PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _api_metrics(queue, query):
    """GET /metrics in Prometheus's text format (version 0.0.4)."""
    _query_params(query, ())
    stats, oldest = queue.stats(), queue.oldest_due()
    lines = _metric_family("litetq_jobs", "gauge", "Jobs now in each status.", [
        ({"queue": name, "status": status}, stats[name].get(status, 0))
        for name in sorted(stats) for status in STATUSES])
    lines += _metric_family(
        "litetq_oldest_due_seconds", "gauge",
        "How long the oldest due, queued job of each queue has waited.",
        [({"queue": name}, oldest.get(name, 0.0)) for name in sorted(set(stats) | set(oldest))])
    lines += _metric_family("litetq_workers", "gauge", "Live workers.",
                            [({}, len(queue.workers()))])
    lines += _metric_family(
        "litetq_steps_total", "counter", "Steps finished, by outcome.",
        [({"queue": name, "task": task, "outcome": outcome}, n)
         for (name, task, outcome), n in sorted(queue.step_counts().items())])
    return _WebText(("\n".join(lines) + "\n").encode(), _PROMETHEUS_TYPE)


def _metric_family(name, kind, help_text, samples):
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{key}="{_label_value(label)}"' for key, label in labels.items())
        lines.append(f"{name}{{{text}}} {value!r}" if text else f"{name} {value!r}")
    return lines


def _label_value(text):
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _api_workers(queue, query):
    _query_params(query, ())
    return {"workers": queue.workers()}


def _api_chart(queue, query):
    _query_params(query, ())
    return queue.steps_per_minute(60)



def _api_run_schedule(queue, query, name):
    """POST /api/schedules/NAME/run: enqueue the entry's call now, as its next fire
    would; the schedule itself is left as it is."""
    _query_params(query, ())
    name = _path_name(name, "cron entry name")
    for entry in queue.schedules():
        if entry["name"] == name:
            return queue.enqueue(entry["task"], queue=entry["queue"]).to_dict()
    raise _WebError(404, f"no cron entry named {name!r}")


_WEB_FILTERS = ("status", "queue", "task", "q")
_WEB_ROUTES = (
    ("GET", re.compile(r"/api/stats"), _api_stats),
    ("GET", re.compile(r"/api/queues"), _api_queues),
    ("POST", re.compile(r"/api/queues/([^/]+)/(pause|resume)"), _api_pause),
    ("GET", re.compile(r"/api/jobs"), _api_jobs),
    ("POST", re.compile(r"/api/jobs/(retry|cancel)"), _api_jobs_action),
    ("GET", re.compile(r"/api/jobs/(?!(?:retry|cancel)$)([^/]+)"), _api_job),
    ("POST", re.compile(r"/api/jobs/([^/]+)/(retry|cancel)"), _api_action),
    ("GET", re.compile(r"/api/schedules"), _api_schedules),
    # Observability (SPEC section 15)
    ("GET", re.compile(r"/metrics"), _api_metrics),
    ("GET", re.compile(r"/api/workers"), _api_workers),
    ("GET", re.compile(r"/api/chart"), _api_chart),

    ("POST", re.compile(r"/api/schedules/([^/]+)/run"), _api_run_schedule),
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


def _path_name(text, what):
    """A queue or cron entry name from a URL path segment (percent-encoded)."""
    try:
        return _name(urllib.parse.unquote(text, errors="strict"), what)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _WebError(400, f"bad {what} {text!r}: {exc}") from None


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

    timeout = 10  # seconds a connection may stay silent: idle ones cannot pin threads

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
            answer = func(self.server.queue, url.query, *groups)
            if isinstance(answer, _WebText):
                return self._send(200, answer.body, answer.ctype)
            self._send_json(200, answer)
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
  --card:#fff; --accent:#3563d6; --bad:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;
  color:var(--fg); background:var(--bg); }
header { display:flex; align-items:baseline; gap:1em; padding:14px 24px;
  background:#1d2330; color:#fff; }
header h1 { margin:0; font-size:20px; letter-spacing:.5px; }
#status { color:#aab2c5; font-size:13px; }
#status.bad { color:#ff9b8f; }
main { max-width:1280px; margin:0 auto; padding:16px 24px 40px; }
section { background:var(--card); border:1px solid var(--line);
  border-radius:8px; margin:0 0 16px; padding:12px 16px; min-width:0; overflow-x:auto; }
.grid { display:grid; grid-template-columns:minmax(0,3fr) minmax(0,2fr); gap:16px;
  margin-bottom:16px; }
.grid > section { margin:0; }
@media (max-width:900px) { .grid { grid-template-columns:1fr; } }
h2 { font-size:15px; margin:0 0 8px; }
h2 .count, h2 .sub { color:var(--muted); font-weight:normal; }
h2 .sub { font-size:12px; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line);
  vertical-align:middle; }
th { font-size:12px; color:var(--muted); font-weight:600;
  text-transform:uppercase; letter-spacing:.4px; white-space:nowrap; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
td.zero { color:#c3c8d2; }
.task { font-family:ui-monospace,Menlo,Consolas,monospace; font-size:13px;
  max-width:420px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
td .error { color:var(--bad); font-size:12px; max-width:420px; overflow:hidden;
  text-overflow:ellipsis; white-space:nowrap; }
.muted, .empty { color:var(--muted); }
.badge { display:inline-block; padding:0 7px; border-radius:9px; font-size:12px;
  background:#eef0f4; color:#444; white-space:nowrap; }
.s-queued { background:#e8eefc; color:#2c4fa8; }
.s-running { background:#e3f4fb; color:#0d6f96; }
.s-waiting { background:#f1e9fb; color:#6a3fa8; }
.s-complete { background:#e5f5e8; color:#237a36; }
.s-failed { background:#fde8e6; color:var(--bad); }
.s-cancelled, .s-expired { background:#efefef; color:#666; }
.s-paused { background:#fff1d6; color:#8a5a00; margin-left:6px; }
a.filter { color:inherit; text-decoration:none; cursor:pointer; }
a.filter:hover { color:var(--accent); text-decoration:underline; }
.bar { width:120px; height:10px; background:#e9ecf1; border-radius:5px;
  overflow:hidden; display:inline-block; vertical-align:middle; }
.bar > div { height:100%; background:var(--accent); }
.bar.unknown > div { width:100%; opacity:.35; }
button { font:inherit; font-size:12px; padding:2px 10px; border-radius:5px;
  border:1px solid #c9ceda; background:#fff; cursor:pointer; white-space:nowrap; }
button:hover:not(:disabled) { border-color:var(--accent); color:var(--accent); }
button.danger:hover:not(:disabled) { border-color:var(--bad); color:var(--bad); }
button:disabled { opacity:.45; cursor:default; }
a.job { color:var(--accent); text-decoration:none; cursor:pointer; }
.failure { border-top:1px solid var(--line); padding:8px 0; }
.failure:first-of-type { border-top:0; }
.failure .head, h2.title { display:flex; gap:10px; align-items:center; }
h2.title > button { margin-left:auto; }
.actions button + button { margin-left:4px; }
.failure .error { color:var(--bad); margin:2px 0; white-space:pre-wrap;
  word-break:break-word; }
pre { background:#f3f4f7; border:1px solid var(--line); border-radius:6px;
  padding:8px 10px; overflow:auto; max-height:320px; font-size:12px;
  white-space:pre-wrap; word-break:break-word; margin:0 0 10px; }
details summary { cursor:pointer; color:var(--muted); font-size:12px; }
.filters { display:flex; flex-wrap:wrap; gap:8px; align-items:center; margin:0 0 10px; }
.filters select, .filters input { font:inherit; font-size:13px; padding:3px 6px;
  border:1px solid #c9ceda; border-radius:5px; background:#fff; max-width:220px; }
.filters input[type=search] { max-width:none; }
.filters input[type=search] { flex:1; min-width:220px; }
.filters .spacer { flex:1; }
.pager { display:flex; gap:8px; align-items:center; margin-top:8px; }
.pager .note { color:var(--muted); font-size:12px; }
svg.chart { width:100%; height:auto; display:block; }
svg.chart .axis { stroke:#c9ceda; stroke-width:1; }
svg.chart text { fill:var(--muted); font-size:10px; }
.legend { display:flex; flex-wrap:wrap; gap:4px 14px; font-size:12px; margin-top:4px; }
.legend .swatch { display:inline-block; width:10px; height:10px; border-radius:2px;
  margin-right:5px; vertical-align:-1px; }
.steps a + a { margin-left:6px; }
td.wrap { overflow-wrap:anywhere; min-width:80px; }
dialog { border:1px solid var(--line); border-radius:10px; padding:0;
  width:min(900px,94vw); max-height:88vh; }
dialog .inner { padding:14px 18px; }
dialog h3 { font-size:13px; margin:12px 0 4px; color:var(--muted); }
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
const RETRYABLE = ["failed", "cancelled", "expired"];
const CANCELLABLE = ["queued", "running", "waiting"];
const OUTCOMES = {complete: "#3a9a52", continued: "#6aa5e8", retried: "#e0a93b",
                  failed: "#d2463b", cancelled: "#9aa0ab", expired: "#b9a3dc"};
const PAGE_SIZE = 25;
const SVG = "http://www.w3.org/2000/svg";
const openTracebacks = new Set();
const taskNames = new Set();
// The jobs list: its filters, the id it starts below (null: the newest) and
// the starts of the pages before it, for "Newer".
const view = {status: "", queue: "", task: "", q: "", before: null, back: [], next: null};
const FILTERS = ["status", "queue", "task", "q"];
let typing;  // the timer that applies what is typed in a filter, after a pause
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

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

function fill(id, ...children) {
  document.getElementById(id).replaceChildren(...children.flat());
}

function ago(seconds) {
  const abs = Math.abs(Math.round(seconds));
  return abs < 60 ? abs + "s" : abs < 3600 ? Math.round(abs / 60) + "m"
    : abs < 86400 ? Math.round(abs / 3600) + "h" : Math.round(abs / 86400) + "d";
}

function when(epoch) {
  if (epoch === null || epoch === undefined) return el("span", {className: "muted"}, "—");
  const secs = epoch - Date.now() / 1000;
  return el("span", {title: new Date(epoch * 1000).toLocaleString()},
            secs > 0.5 ? "in " + ago(secs) : ago(secs) + " ago");
}

function badge(status) {
  return el("span", {className: "badge s-" + status}, status);
}

function jobLink(id) {
  return el("a", {className: "job", href: "#job=" + Number(id)}, "#" + Number(id));
}

function taskCell(job) {
  return el("td", {},
    el("div", {className: "task", title: job.task}, job.task),
    job.error ? el("div", {className: "error", title: job.error}, job.error) : null);
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
  if (CANCELLABLE.includes(job.status)) {
    buttons.push(el("button", {className: "danger", onclick: () => act(job.id, "cancel")},
                    "Cancel"));
  }
  if (RETRYABLE.includes(job.status)) {
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

async function post(path) {
  // The JSON content type and the custom header make this a request that
  // no other site can send here without a CORS preflight.
  const headers = {"Content-Type": "application/json", "X-Litetq": "1"};
  if (token) headers.Authorization = "Bearer " + token;
  try {
    return await api(path, {method: "POST", headers, body: "{}"});
  } catch (err) {
    if (err.status !== 401) throw err;
    const given = prompt("This server needs its token to change jobs or queues:");
    if (!given) throw new Error("no token given");
    token = given;
    sessionStorage.setItem("litetq-token", token);
    return post(path);
  }
}

async function perform(path, done) {
  let answer;
  try { answer = await post(path); } catch (err) { return toast(err.message); }
  if (done) toast(done(answer));
  refresh();
  return answer;
}

async function act(id, action) {
  await perform(`/api/jobs/${Number(id)}/${action}`);
  const dialog = document.getElementById("detail");
  if (dialog.open && dialog.dataset.job === String(id)) showJob(id);
}

function segment(name) {
  // encodeURIComponent leaves "." alone, and a browser would resolve "..".
  return encodeURIComponent(name).replace(/\./g, "%2E");
}

function setFilter(changes) {
  // The inputs hold the filters; a link may change some of them first.
  clearTimeout(typing);
  for (const key of FILTERS) {
    const input = document.getElementById("f-" + key);
    if (key in changes) input.value = changes[key];
    view[key] = input.value;
  }
  Object.assign(view, {before: null, back: []});
  refresh();
}

function filterLink(text, changes) {
  return el("a", {className: "filter", href: "#", title: "show these jobs",
                  onclick: event => { event.preventDefault(); setFilter(changes); }}, text);
}

function renderQueues(queues) {
  const select = document.getElementById("f-queue");
  const names = queues.map(q => q.name);
  if (select.dataset.names !== JSON.stringify(names)) {
    select.dataset.names = JSON.stringify(names);
    const chosen = view.queue;
    select.replaceChildren(el("option", {value: ""}, "all queues"),
      ...names.map(name => el("option", {value: name}, name)));
    if (chosen && !names.includes(chosen)) select.append(el("option", {value: chosen}, chosen));
    select.value = chosen;
  }
  const rows = queues.map(q => {
    const total = Object.values(q.counts).reduce((a, b) => a + b, 0);
    const toggle = q.paused ? "resume" : "pause";
    return el("tr", {},
      el("td", {className: "wrap"}, filterLink(q.name, {queue: q.name, status: ""}),
         q.paused ? el("span", {className: "badge s-paused"}, "paused") : null),
      STATUSES.map(s => el("td", {className: "num" + (q.counts[s] ? "" : " zero")},
        q.counts[s] ? filterLink(q.counts[s], {queue: q.name, status: s}) : 0)),
      el("td", {className: "num"}, total),
      el("td", {className: "actions"}, el("button", {
        className: q.paused ? "" : "danger",
        onclick: () => perform(`/api/queues/${segment(q.name)}/${toggle}`)},
        q.paused ? "Resume" : "Pause")));
  });
  fill("queues", table(["queue", ...STATUSES.map(s => " " + s), " total", ""], rows,
                       "No jobs yet."));
}

function renderChart(chart) {
  if (!chart) return fill("chart", el("p", {className: "empty"}, "no data"));
  const outcomes = Object.keys(OUTCOMES).filter(o => chart.series[o]);
  const minutes = chart.minutes;
  const totals = Array.from({length: minutes}, (_, i) =>
    outcomes.reduce((sum, o) => sum + (chart.series[o][i] || 0), 0));
  const top = Math.max(1, ...totals);
  const W = 600, H = 150, left = 34, bottom = 16, plot = H - bottom - 6;
  const step = (W - left) / minutes;
  const parts = [svg("line", {class: "axis", x1: left, y1: H - bottom, x2: W, y2: H - bottom}),
    svg("text", {x: left - 4, y: 10, "text-anchor": "end"}, String(top)),
    svg("text", {x: left - 4, y: H - bottom, "text-anchor": "end"}, "0")];
  for (const [x, label, anchor] of [[left, "-60m", "start"], [(left + W) / 2, "-30m", "middle"],
                                     [W, "now", "end"]]) {
    parts.push(svg("text", {x, y: H - 3, "text-anchor": anchor}, label));
  }
  for (let i = 0; i < minutes; i++) {
    let y = H - bottom;
    const time = new Date((chart.start + 60 * i) * 1000).toLocaleTimeString(
      [], {hour: "2-digit", minute: "2-digit"});
    const detail = outcomes.filter(o => chart.series[o][i])
      .map(o => `${o} ${chart.series[o][i]}`).join(", ");
    const group = svg("g", {}, svg("title", {}, `${time}: ${detail || "nothing finished"}`));
    for (const o of outcomes) {
      const height = plot * (chart.series[o][i] || 0) / top;
      if (!height) continue;
      y -= height;
      group.append(svg("rect", {x: (left + i * step + 1).toFixed(1), y: y.toFixed(1),
        width: Math.max(1, step - 2).toFixed(1), height: height.toFixed(1), fill: OUTCOMES[o]}));
    }
    parts.push(group);
  }
  const sums = Object.fromEntries(outcomes.map(
    o => [o, chart.series[o].reduce((a, b) => a + b, 0)]));
  const legend = el("div", {className: "legend"}, outcomes.map(o => {
    const swatch = el("span", {className: "swatch"});
    swatch.style.background = OUTCOMES[o];
    return el("span", {}, swatch, `${o} ${sums[o]}`);
  }));
  fill("chart", svg("svg", {class: "chart", viewBox: `0 0 ${W} ${H}`,
                            role: "img",
                            "aria-label": "steps finished per minute"}, ...parts), legend);
}

function renderWorkers(answer) {
  if (!answer) {
    document.getElementById("workers-count").textContent = "";
    return fill("workers", el("p", {className: "empty"}, "no data"));
  }
  const workers = answer.workers;
  document.getElementById("workers-count").textContent = `(${workers.length})`;
  const rows = workers.map(w => el("tr", {},
    el("td", {className: "wrap"}, w.host), el("td", {className: "num"}, w.pid),
    el("td", {className: "wrap"},
       w.queues ? w.queues.join(", ") : el("span", {className: "muted"}, "all")),
    el("td", {className: "num"}, w.concurrency ?? "—"),
    el("td", {className: "num"}, ago(w.heartbeat_age) + " ago"),
    el("td", {className: "steps wrap"}, w.steps.length ? w.steps.map(s => {
      const link = jobLink(s.id);
      link.title = s.task;
      return link;
    }) : el("span", {className: "muted"}, "idle"))));
  fill("workers", table(["host", " pid", "queues", " conc.", " heartbeat", "steps"], rows,
                        "No live workers."));
}

function renderRunning(jobs) {
  document.getElementById("running-count").textContent = jobs.length ? `(${jobs.length})` : "";
  const rows = jobs.map(job => el("tr", {}, el("td", {}, jobLink(job.id)), taskCell(job),
    el("td", {className: "wrap"}, job.queue), el("td", {}, bar(job.progress)),
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

function filterQuery() {
  const params = new URLSearchParams();
  for (const key of FILTERS) {
    if (view[key]) params.set(key, view[key]);
  }
  return params;
}

function renderJobs(answer) {
  view.next = answer.next_before;
  for (const job of answer.jobs) taskNames.add(job.name);
  const names = [...taskNames].sort();
  const list = document.getElementById("task-names");
  if (list.childElementCount !== names.length) {
    list.replaceChildren(...names.map(name => el("option", {value: name})));
  }
  const rows = answer.jobs.map(job => el("tr", {},
    el("td", {}, jobLink(job.id)), el("td", {}, badge(job.status)), taskCell(job),
    el("td", {className: "wrap"}, job.queue), el("td", {}, bar(job.progress)),
    el("td", {className: "num"}, job.attempts), el("td", {}, when(job.created)), actions(job)));
  const filtered = filterQuery().toString() !== "";
  fill("jobs", table(["id", "status", "task", "queue", "progress", " attempts", "created", ""],
                     rows, filtered ? "No jobs match." : "No jobs yet."));
  document.getElementById("newer").disabled = view.before === null;
  document.getElementById("older").disabled = view.next === null;
  const ids = answer.jobs.map(job => job.id);
  let note = view.before === null ? "newest" : `below #${view.before}`;
  if (ids.length) note = `#${Math.max(...ids)} – #${Math.min(...ids)}`;
  if (view.q && answer.jobs.length < PAGE_SIZE && view.next !== null) {
    note += ` · searched down to #${view.next}; "Older" searches further back`;
  }
  document.getElementById("page-note").textContent = note;
  const status = view.status;
  document.getElementById("retry-all").disabled = !!status && !RETRYABLE.includes(status);
  document.getElementById("cancel-all").disabled = !!status && !CANCELLABLE.includes(status);
}

function renderSchedules(entries) {
  const rows = entries.map(e => el("tr", {}, el("td", {className: "wrap"}, e.name),
    el("td", {className: "task"}, e.spec), el("td", {className: "task", title: e.task}, e.task),
    el("td", {className: "wrap"}, e.queue ?? el("span", {className: "muted"}, "task's queue")),
    el("td", {}, e.tz || "UTC"),
    el("td", {}, when(e.next_run)), el("td", {}, when(e.last_run)),
    el("td", {className: "actions"}, el("button", {onclick: () => perform(
      `/api/schedules/${segment(e.name)}/run`, job => `started job #${job.id}`)}, "Run now"))));
  fill("schedules", table(["name", "spec", "task", "queue", "tz", "next run", "last run", ""],
                          rows, "No schedules."));
}

async function bulk(action) {
  const params = filterQuery();
  const what = [...params].map(([k, v]) => `${k} = ${v}`).join(", ") || "no filter";
  const states = action === "retry" ? "failed, cancelled or expired" : "queued, running or waiting";
  if (!confirm(`${action === "retry" ? "Retry" : "Cancel"} every ${states} job ` +
               `that matches (${what})?`)) return;
  const query = params.toString() ? "?" + params : "";
  await perform(`/api/jobs/${action}${query}`,
                answer => `${action === "retry" ? "retried" : "cancelled"} ${answer.count} jobs`);
}

function field(name, value) {
  return [el("dt", {}, name), el("dd", {}, value === null || value === undefined ? "—" : value)];
}

function pretty(value) {
  return el("pre", {}, JSON.stringify(value, null, 2));
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
    el("dl", {}, field("task", el("span", {className: "task"}, job.name)),
       field("queue", job.queue), field("priority", job.priority),
       field("attempts", job.attempts), field("steps", job.steps),
       field("progress", job.progress && bar(job.progress)),
       field("created", when(job.created)), field("started", when(job.started)),
       field("finished", when(job.finished)), field("due", when(job.due)),
       field("parent", job.parent_id && jobLink(job.parent_id)),
       field("children", job.children.length ? job.children.map(c => [jobLink(c), " "]) : null),
       field("error", job.error)),
    el("h3", {}, "Call"), el("pre", {className: "call"}, job.task),
    el("h3", {}, "Arguments"), pretty(job.args),
    Object.keys(job.kwargs).length ? [el("h3", {}, "Keyword arguments"), pretty(job.kwargs)] : [],
    job.status === "complete" ? [el("h3", {}, "Result"), pretty(job.result)] : [],
    job.traceback ? [el("h3", {}, "Traceback"), el("pre", {}, job.traceback)] : [],
    el("h3", {}, "Logs"), table(["time", "level", "job", "message"], logs, "No log lines.")));
  dialog.dataset.job = job.id;
  if (!dialog.open) dialog.showModal();
}

function fromHash() {
  const match = /^#job=(\d+)$/.exec(location.hash);
  if (match) showJob(match[1]);
}

async function optional(path) {
  // Panels whose endpoint this server may not have answer "no data".
  try { return await api(path); } catch (err) { return null; }
}

let refreshes = 0;  // a refresh renders only if no later one began meanwhile

async function refresh() {
  const mine = ++refreshes;
  const jobsQuery = filterQuery();
  jobsQuery.set("limit", PAGE_SIZE);
  if (view.before !== null) jobsQuery.set("before", view.before);
  optional("/api/chart").then(chart => mine === refreshes && renderChart(chart));
  optional("/api/workers").then(workers => mine === refreshes && renderWorkers(workers));
  try {
    const [queues, running, failed, jobs, schedules] = await Promise.all([
      api("/api/queues"), api("/api/jobs?status=running&limit=50"),
      api("/api/jobs?status=failed&limit=10"), api("/api/jobs?" + jobsQuery),
      api("/api/schedules")]);
    if (mine !== refreshes) return;
    renderQueues(queues.queues); renderRunning(running.jobs); renderFailures(failed.jobs);
    renderJobs(jobs); renderSchedules(schedules);
    setStatus("updated " + new Date().toLocaleTimeString(), false);
  } catch (err) {
    if (mine === refreshes) setStatus("cannot reach the server: " + err.message, true);
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

function setUp() {
  document.getElementById("f-status").append(
    ...STATUSES.map(s => el("option", {value: s}, s)));
  for (const key of FILTERS) {
    const input = document.getElementById("f-" + key);
    const apply = () => { if (input.value !== view[key]) setFilter({}); };
    input.addEventListener("change", apply);
    input.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(apply, 300); });
  }
  document.getElementById("older").addEventListener("click", () => {
    if (view.next === null) return;
    view.back.push(view.before);
    view.before = view.next;
    refresh();
  });
  document.getElementById("newer").addEventListener("click", () => {
    if (!view.back.length) return;
    view.before = view.back.pop();
    refresh();
  });
  document.getElementById("retry-all").addEventListener("click", () => bulk("retry"));
  document.getElementById("cancel-all").addEventListener("click", () => bulk("cancel"));
  document.getElementById("detail").addEventListener("close", () => {
    if (location.hash) history.replaceState(null, "", location.pathname);
  });
  window.addEventListener("hashchange", fromHash);
}

setUp();
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
<div class="grid">
<section><h2>Finished steps <span class="sub">per minute, last hour</span></h2>
<div id="chart"></div></section>
<section><h2>Workers <span class="count" id="workers-count"></span></h2>
<div id="workers"></div></section>
</div>
<section><h2>Running <span class="count" id="running-count"></span></h2>
<div id="running"></div></section>
<section><h2>Recent failures <span class="count" id="failures-count"></span></h2>
<div id="failures"></div></section>
<section><h2>Jobs</h2>
<div class="filters">
<select id="f-status" aria-label="status"><option value="">all statuses</option></select>
<select id="f-queue" aria-label="queue"><option value="">all queues</option></select>
<input id="f-task" list="task-names" placeholder="task name" aria-label="task">
<datalist id="task-names"></datalist>
<input id="f-q" type="search" placeholder="search id, task, arguments, error" aria-label="search">
<button id="retry-all">Retry all</button>
<button id="cancel-all" class="danger">Cancel all</button>
</div>
<div id="jobs"></div>
<div class="pager"><button id="newer">← Newer</button><button id="older">Older →</button>
<span class="note" id="page-note"></span></div>
</section>
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
    """'90', '90s', '15m', '12h', '7d' -> seconds: a finite number, at least 0."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        value = (float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 15m, 12h, 7d)")
    return value


def _json_arg(text):
    if _clean_text(text) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8")
    try:
        return json.loads(text)
    except RecursionError:
        raise argparse.ArgumentTypeError("the JSON nests too deeply") from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"malformed JSON {text!r}: {exc}")


def _bounded(kind, minimum=0.0, maximum=None):
    """An argparse type: a number of `kind` in [minimum, maximum]."""
    def parse(text):
        try:
            value = _duration(text) if kind is float else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range: must be at least {minimum:g}"
                + (f" and at most {maximum:g}" if maximum is not None else ""))
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _job_ids(text):
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 2 ** 63:
        raise argparse.ArgumentTypeError(f"not a job id: {text!r} (ids are whole numbers "
                                         f"from 1 to {2 ** 63 - 1})")
    return int(text)


def _keep(text):
    """'complete=2h,failed=forever' -> {"complete": 7200.0, "failed": None}."""
    keep = {}
    for item in text.split(","):
        status, equals, age = item.strip().partition("=")
        if status not in TERMINAL or not equals:
            raise argparse.ArgumentTypeError(
                f"{item!r}: give STATUS=AGE, STATUS one of {', '.join(TERMINAL)} "
                f"and AGE like 2h, 30d or forever")
        keep[status] = None if age.strip() == "forever" else _duration(age.strip())
    return keep


def _synchronous_arg(parser):
    parser.add_argument("--synchronous", type=str.upper, choices=["NORMAL", "FULL"],
                        help="SQLite: FULL makes every commit survive power loss "
                             "(default NORMAL: survives crashes of the application)")


def build_parser():
    parser = _Parser(prog="litetq", description="A durable task queue on SQLite or PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"litetq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    def command(name, help, db=True):
        sub = commands.add_parser(name, help=help, description=help)
        if db:
            sub.add_argument("db", metavar="DB", help="a SQLite file or a postgresql:// URL")
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
    worker.add_argument("--async-concurrency", type=_bounded(int, 1, 1024),
                        default=ASYNC_CONCURRENCY, metavar="N",
                        help=f"async steps each process runs at once "
                             f"(default {ASYNC_CONCURRENCY})")
    worker.add_argument("--keep", type=_keep, default={}, metavar="STATUS=AGE,...",
                        help="how long finished jobs are kept, e.g. complete=2h,failed=30d "
                             "or failed=forever (default complete=1d, the others 7d)")
    worker.add_argument("--django", metavar="SETTINGS",
                        help="Django settings module (e.g. mysite.settings): set up Django "
                             "in every process, to run tasks of its TASKS framework")
    _synchronous_arg(worker)

    command("status", "counts per queue and status, oldest wait, live workers")
    jobs = command("jobs", "list jobs, newest first")
    jobs.add_argument("--status", choices=STATUSES)
    jobs.add_argument("--queue")
    jobs.add_argument("--task", help="task name")
    jobs.add_argument("--limit", type=_bounded(int, 0, 2 ** 62), default=50)
    jobs.add_argument("--json", action="store_true", help="JSON lines for scripts")
    show = command("show", "one job: arguments, status, error, traceback, logs, children")
    show.add_argument("id", type=_job_ids)
    show.add_argument("--json", action="store_true")
    retry = command("retry", "queue failed, cancelled or expired jobs again")
    retry.add_argument("ids", type=_job_ids, nargs="*", metavar="ID")
    retry.add_argument("--failed", action="store_true", help="every failed job")
    cancel = command("cancel", "cancel jobs (running ones when their step ends)")
    cancel.add_argument("ids", type=_job_ids, nargs="+", metavar="ID")
    for name, what in (("pause", "workers start no new step from these queues"),
                       ("resume", "let workers take steps from paused queues again")):
        command(name, what).add_argument("queues", nargs="+", metavar="QUEUE")
    purge = command("purge", "delete finished jobs (whole trees of a root and its subtasks)")
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
    web.add_argument("--port", type=_bounded(int, 0, 65535), default=8765)
    web.add_argument("--token", help="required as 'Authorization: Bearer T' for POSTs")
    _synchronous_arg(web)
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
        print(f"litetq: {_clean_text(exc)}", file=sys.stderr)
        return 2
    except (Error, ValueError, TypeError) as exc:
        print(f"litetq: error: {_clean_text(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `litetq jobs DB | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


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


def _open(path, create=False, readonly=False, synchronous=None):
    """The queue at `path`. Admin commands refuse to create a database by mistake, and
    those that only read open it read-only: they work on a read-only file and never
    write a byte, nor create litetq's tables in an application's database."""
    if not create and path != ":memory:" and not _is_url(path) and not os.path.exists(path):
        raise UsageError(f"no database at {path!r}")
    return Queue(path, synchronous, readonly=readonly, create=create)


def _cmd_worker(args):
    queues = [q for q in (args.queues or "").split(",") if q] or None
    worker = Worker(args.db, queues=queues, concurrency=args.concurrency,
                    imports=args.imports, burst=args.burst, reload=args.reload,
                    cron=args.cron, grace=args.grace, lease=args.lease,
                    async_concurrency=args.async_concurrency, keep=args.keep,
                    synchronous=args.synchronous, start_method=args.start_method,
                    log_config=(args.logfile, args.log_level), django=args.django)
    return worker.run()


def _cmd_status(args):
    with _open(args.db, readonly=True) as queue:
        stats, paused = queue.stats(), queue.paused()
        rows = [[name + (" (paused)" if name in paused else ""),
                 *(str(stats.get(name, {}).get(s, 0)) for s in STATUSES)]
                for name in sorted(set(stats) | paused)]
        _print_table(["queue", *STATUSES], rows or [["(no jobs)"] + [""] * len(STATUSES)])
        wait = max(queue.oldest_due().values(), default=None)
        print(f"\noldest due job has waited {wait:.1f} s" if wait else "\nno job is waiting")
        workers = [[w[0], str(w[4]), w[3], "live" if w[6] < 10 else
                    f"lost ({w[6]:.0f} s without heartbeat)"]
                   for w in queue.storage.workers()]
        print()
        _print_table(["worker", "processes", "queues", "state"], workers or [["(none)"]])
    return 0


def _cmd_jobs(args):
    with _open(args.db, readonly=True) as queue:
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
    with _open(args.db, readonly=True) as queue:
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
        ids = args.ids + (queue.storage.jobs("failed", limit=None) if args.failed else [])
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
        count = queue.purge(statuses, args.older_than)
        print(f"purged {count} jobs")
    return 0


def _cmd_pause(args):
    for name in args.queues:
        _name(name, "queue")
    with _open(args.db) as queue:
        for name in args.queues:
            getattr(queue, args.command)(name)
        print(f"{args.command}d: {' '.join(args.queues)}")
    return 0


def _cmd_enqueue(args):
    if not isinstance(args.args, list) or not isinstance(args.kwargs, dict):
        raise UsageError("ARGS_JSON must be a JSON list and --kwargs a JSON object")
    sys.path.insert(0, os.getcwd())
    _lookup_task(args.task)  # unknown tasks are refused here, not in the worker
    task = Task(args.task, args.args, args.kwargs)
    _job_row(task, args.queue, None, args.delay, None, None, None)  # before the file exists
    with _open(args.db, create=True) as queue:
        job = queue.enqueue(task, queue=args.queue, delay=args.delay)
        print(job.id)
    return 0


def _cmd_cron(args):
    if args.action == "add":  # bad input is refused before the database is touched
        if not isinstance(args.args, list):
            raise UsageError("ARGS_JSON must be a JSON list")
        Cron(args.spec, args.tz)
        _name(args.name, "name")
        _job_row(Task(args.task, args.args), args.queue, None, None, None, None, None)
    with _open(args.db, create=args.action == "add", readonly=args.action == "ls") as queue:
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
    with _open(args.db, synchronous=args.synchronous) as queue:
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


COMMANDS = {"worker": _cmd_worker, "pause": _cmd_pause, "resume": _cmd_pause,
            "status": _cmd_status, "jobs": _cmd_jobs, "show": _cmd_show,
            "retry": _cmd_retry, "cancel": _cmd_cancel, "purge": _cmd_purge,
            "enqueue": _cmd_enqueue, "cron": _cmd_cron, "web": _cmd_web, "demo": _cmd_demo}


if __name__ == "__main__":
    # `python -m litetq` runs this file as __main__: hand over to the importable `litetq`
    # module, so user modules doing `import litetq` share one task registry with us.
    import litetq
    sys.exit(litetq.main())
