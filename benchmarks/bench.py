#!/usr/bin/env python3
"""litetq benchmarks: against Huey (SQLite) and procrastinate (PostgreSQL), plus flow
control, asyncio and a retention soak; one run, same machine, peers alternating.

    python benchmarks/bench.py --quick                  # a few minutes
    python benchmarks/bench.py                          # full run
    python benchmarks/bench.py --only pg,flow-idle --runs 5

Needs `huey` (SQLite rows) and `procrastinate` + psycopg 3 (PostgreSQL rows)
importable by this interpreter.  PostgreSQL: $LITETQ_BENCH_POSTGRES, else a
throwaway server started here.  See benchmarks/README.md for what each figure means.

stdout: one table per group of rows (each figure beside the peer's from the same run),
then one JSON object per line per measurement.  Progress goes to stderr.
"""

import argparse
import datetime
import json
import math
import os
import platform
import py_compile
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

QUICK = dict(
    reps=3,
    enqueue_n=300,
    many_n=20_000,
    e2e_n=1_000,
    pickup_n=40,
    pickup_gap=0.020,
    backlog_small=1_000,
    backlog_big=100_000,
    backlog_warm=2_000,
    backlog_window=5_000,
    windows=5,
    huey_backlog_warm=300,
    huey_backlog_window=700,
    footprint_jobs=10_000,
    footprint_cap=2.0,
    countdown_n=2_000,
    countdown_n_huey=300,
    huey_big_backlog=False,
    # PostgreSQL, flow control, asyncio, retention (see the README)
    pg_enqueue_n=300,
    pg_many_n=5_000,
    pg_e2e_n=1_000,
    pg_pickup_n=40,
    pg_countdown_n=500,
    flow_n=2_000,
    held_n=10_000,
    held_runnable=10,
    idle_s=2.0,
    async_sleep_n=200,
    sync_sleep_n=200,
    noop_steps_n=1_000,
    waiters_n=10_000,
    soak_n=100_000,
    soak_every=2.0,
)
FULL = dict(
    reps=3,
    enqueue_n=5_000,
    many_n=100_000,
    e2e_n=10_000,
    pickup_n=200,
    pickup_gap=0.020,
    backlog_small=1_000,
    backlog_big=1_000_000,
    backlog_warm=5_000,
    backlog_window=20_000,
    windows=5,
    huey_backlog_warm=500,
    huey_backlog_window=2_000,
    footprint_jobs=200_000,
    footprint_cap=90.0,
    countdown_n=20_000,
    countdown_n_huey=2_000,
    huey_big_backlog=True,
    pg_enqueue_n=2_000,
    pg_many_n=50_000,
    pg_e2e_n=10_000,
    pg_pickup_n=200,
    pg_countdown_n=5_000,
    flow_n=10_000,
    held_n=10_000,
    held_runnable=10,
    idle_s=3.0,
    async_sleep_n=1_000,
    sync_sleep_n=1_000,
    noop_steps_n=10_000,
    waiters_n=10_000,
    soak_n=1_000_000,
    soak_every=5.0,
)

LITETQ_TASKS = '''\
"""litetq benchmark tasks (written by benchmarks/bench.py)."""
import time
import litetq


@litetq.task
def noop():
    pass


@litetq.task
def tick():
    return time.time()


@litetq.task
def stamp(t_enq):
    return [t_enq, time.time()]


@litetq.task
def countdown(n, t0=None):
    if t0 is None:
        t0 = time.time()
    if n:
        return countdown(n - 1, t0)
    return [t0, time.time()]
'''

HUEY_TASKS = '''\
"""Huey benchmark tasks (written by benchmarks/bench.py); SqliteHuey as shipped."""
import os
import time
from huey import SqliteHuey

huey = SqliteHuey(filename=os.environ.get("BENCH_HUEY_DB", "huey-bench.db"))


@huey.task()
def noop():
    pass


@huey.task()
def done():
    return True


@huey.task()
def tick():
    return time.time()


@huey.task()
def stamp(t_enq):
    return [t_enq, time.time()]


@huey.task()
def countdown(n, t0=None):
    # Huey has no continuations: the closest equivalent re-enqueues itself.
    if t0 is None:
        t0 = time.time()
    if n:
        countdown(n - 1, t0)
    else:
        huey.put("countdown", [t0, time.time()])
'''


FLOW_TASKS = """\
\"\"\"litetq flow-control benchmark tasks (written by benchmarks/bench.py).\"\"\"
import time
import litetq


@litetq.task
def free():
    pass


@litetq.task(concurrency=4)
def capped():
    pass


@litetq.task(rate="1000/s")
def paced():
    pass


@litetq.task(concurrency=1)
def gate(hold=0.0):
    # gate(hold) takes the only slot and keeps it `hold` seconds; every other
    # gate() step is held back by the limit until then.
    time.sleep(hold)


@litetq.task
def stamp2(t_enq):
    return [t_enq, time.time()]
"""

ASYNC_TASKS = """\
\"\"\"litetq asyncio benchmark tasks (written by benchmarks/bench.py).\"\"\"
import asyncio
import time
import litetq


@litetq.task
async def anap(s):
    await asyncio.sleep(s)


@litetq.task
def snap(s):
    time.sleep(s)


@litetq.task
async def atick():
    return time.time()


@litetq.task
def stick():
    return time.time()
"""

PROCRASTINATE_TASKS = """\
\"\"\"procrastinate benchmark tasks (written by benchmarks/bench.py), as documented:
an App on a PsycopgConnector (psycopg 3), run by `procrastinate worker`.\"\"\"
import os
import time
import procrastinate

app = procrastinate.App(connector=procrastinate.PsycopgConnector(
    conninfo=os.environ.get("BENCH_PROCRASTINATE_DSN", "")))


@app.task(name="noop")
def noop():
    pass


@app.task(name="stamp")
def stamp(t_enq):
    # procrastinate stores no results: the start time goes to a file
    t = time.time()
    with open(os.environ["BENCH_STAMPS"], "a") as f:
        f.write("%r %r\\n" % (t_enq, t))
"""

# An async waiter in a process of its own: enqueues N jobs, awaits them all
# (asyncio.gather of job.aresult()), reports its CPU while nothing runs, then
# the wake-up latency of each waiter once a worker runs the jobs.
WAITER_SCRIPT = """\
import asyncio, json, os, sys, time
import litetq
import benchtasks_async

db, n, idle_s, go_file = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
q = litetq.Queue(db)
litetq.use(q)
jobs = q.enqueue_many([benchtasks_async.stick() for _ in range(n)])


async def wait_one(job):
    finished = await job.aresult(timeout=600)
    return time.time() - finished


async def main():
    waiters = asyncio.ensure_future(asyncio.gather(*(wait_one(j) for j in jobs)))
    await asyncio.sleep(0.5)                       # every waiter is parked
    c0, t0 = time.process_time(), time.monotonic()
    await asyncio.sleep(idle_s)
    cpu = (time.process_time() - c0) / (time.monotonic() - t0)
    with open(go_file, "w") as f:                  # the parent starts the worker now
        f.write("go")
    lat = await waiters
    print(json.dumps({"idle_cpu": cpu, "lat": lat}))


asyncio.run(main())
q.close()
"""

def log(*a):
    print("[bench %6.1fs]" % (time.monotonic() - T_START), *a, file=sys.stderr, flush=True)


T_START = time.monotonic()


# --------------------------------------------------------------------------- utils

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, p):
    s = sorted(xs)
    if not s:
        return None
    k = max(0, math.ceil(p / 100.0 * len(s)) - 1)
    return s[k]


def rm_db(path):
    for suf in ("", "-wal", "-shm", "-journal"):
        try:
            os.remove(path + suf)
        except FileNotFoundError:
            pass


def fsize(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        return None
    return out


def _children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(root):
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        for c in kids.get(p, ()):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Monitor(threading.Thread):
    """Samples VmHWM/VmRSS of a subprocess tree and the WAL size of a database."""

    def __init__(self, root_pid=None, wal=None, interval=0.05):
        super().__init__(daemon=True)
        self.root = root_pid
        self.wal = wal
        self.interval = interval
        self.hwm = {}        # pid -> peak VmHWM seen
        self.rss_first = {}  # pid -> first VmRSS seen after mark()
        self.rss_mark = {}
        self.rss_last = {}
        self.role = {}
        self.wal_max = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def set_root(self, pid):
        self.root = pid

    def sample(self):
        if self.wal:
            self.wal_max = max(self.wal_max, fsize(self.wal))
        if self.root is None:
            return
        pids = [self.root] + descendants(self.root)
        with self._lock:
            for pid in pids:
                st = _read_status(pid)
                if not st or "VmHWM" not in st:
                    continue
                if pid not in self.role:
                    cmd = _cmdline(pid)
                    if pid == self.root:
                        self.role[pid] = "supervisor"
                    elif "resource_tracker" in cmd or "forkserver" in cmd:
                        self.role[pid] = "helper"
                    else:
                        self.role[pid] = "worker"
                self.hwm[pid] = max(self.hwm.get(pid, 0), st["VmHWM"])
                self.rss_first.setdefault(pid, st["VmRSS"])
                self.rss_last[pid] = st["VmRSS"]

    def mark(self):
        self.sample()
        with self._lock:
            self.rss_mark = dict(self.rss_last)

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()

    def summary(self):
        mb = 1024 * 1024
        sup = [v for p, v in self.hwm.items() if self.role.get(p) == "supervisor"]
        wrk = [v for p, v in self.hwm.items() if self.role.get(p) == "worker"]
        growth = [self.rss_last[p] - self.rss_mark[p] for p in self.rss_mark
                  if p in self.rss_last and self.role.get(p) != "helper"]
        return {
            "supervisor_peak_mb": round(max(sup) / mb, 1) if sup else None,
            "worker_peak_mb": round(max(wrk) / mb, 1) if wrk else None,
            "worker_processes": len(wrk),
            "max_process_peak_mb": round(max(sup + wrk) / mb, 1) if sup + wrk else None,
            "rss_growth_mb": round(max(growth) / mb, 1) if growth else None,
            "wal_max_mb": round(self.wal_max / mb, 1) if self.wal else None,
        }


# --------------------------------------------------------------------------- PostgreSQL

PG_BIN = os.environ.get("LITETQ_BENCH_PG_BIN", "/usr/lib/postgresql/15/bin")
# Durability as a server ships: fsync, synchronous_commit and full_page_writes stay on.
PG_SETTINGS = {"listen_addresses": "127.0.0.1", "max_connections": "200",
               "log_min_messages": "fatal"}


def _is_url(db):
    return db.startswith(("postgresql://", "postgres://"))


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """The PostgreSQL server of the PG rows: $LITETQ_BENCH_POSTGRES if set, else a
    throwaway cluster in a temp folder (initdb + pg_ctl, as user postgres when we
    are root, on a loopback port).  Every measurement gets a database of its own."""

    def __init__(self, parent_dir=None):
        import psycopg
        self.psycopg = psycopg
        self.folder = None
        self.counter = 0
        self.base = os.environ.get("LITETQ_BENCH_POSTGRES")
        if self.base:
            self.how = "$LITETQ_BENCH_POSTGRES"
        else:
            try:
                self._start(parent_dir)
            except Exception:
                self.close()
                raise
            self.how = "throwaway cluster in %s, port %d" % (self.folder, self.port)
        with psycopg.connect(self.base, autocommit=True, connect_timeout=10) as c:
            show = {k: c.execute("show " + k).fetchone()[0] for k in (
                "server_version", "fsync", "synchronous_commit", "full_page_writes",
                "shared_buffers", "max_connections")}
        self.settings = ", ".join("%s=%s" % kv for kv in show.items())

    def _run(self, program, *args):
        cmd = [os.path.join(PG_BIN, program), *args]
        if os.geteuid() == 0:           # the server refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError("%s failed: %s%s" % (program, done.stdout, done.stderr))

    def _start(self, parent_dir):
        # Not inside the bench folder: that one is mode 0700 and the server runs as postgres.
        self.folder = tempfile.mkdtemp(prefix="litetq-bench-pg-", dir=parent_dir)
        if os.geteuid() == 0:
            import pwd
            pw = pwd.getpwnam("postgres")
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
        data = os.path.join(self.folder, "data")
        self._run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--locale", "C", "--no-sync")   # --no-sync: initdb only; the server fsyncs
        opts = dict(PG_SETTINGS, unix_socket_directories=self.folder)
        for attempt in range(5):        # another process may take the free port first
            self.port = _free_port()
            try:
                self._run("pg_ctl", "start", "-w", "-t", "60", "-D", data, "-l",
                          os.path.join(self.folder, "log"), "-o", "-p %d %s" % (
                              self.port, " ".join("-c %s=%s" % kv for kv in opts.items())))
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        self.base = "postgresql://postgres@127.0.0.1:%d/postgres" % self.port

    def sql(self, statement, url=None):
        with self.psycopg.connect(url or self.base, autocommit=True, connect_timeout=10) as c:
            cur = c.execute(statement)
            return cur.fetchall() if cur.description else None

    def database(self, tag):
        """A fresh, empty database; its URL."""
        self.counter += 1
        name = "bench_%d_%03d_%s" % (os.getpid(), self.counter, tag.replace("-", "_"))
        self.sql('create database "%s"' % name)
        return _with_dbname(self.base, name)

    def drop(self, url):
        import urllib.parse
        name = urllib.parse.urlsplit(url).path.lstrip("/")
        try:
            self.sql('drop database if exists "%s" with (force)' % name)
        except Exception:  # noqa: BLE001
            pass

    def close(self):
        if self.folder and os.path.isdir(os.path.join(self.folder, "data")):
            try:
                self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D",
                          os.path.join(self.folder, "data"))
            except Exception:  # noqa: BLE001
                pass
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _with_dbname(url, name):
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def tree_cpu(root):
    """{pid: CPU seconds (user + system)} of root and every process under it."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in [root] + descendants(root):
        try:
            with open("/proc/%d/stat" % pid) as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_percent(root, seconds):
    """CPU % (of one core) that root's process tree uses over the next `seconds`."""
    a = tree_cpu(root)
    t = time.monotonic()
    time.sleep(seconds)
    b = tree_cpu(root)
    dt = time.monotonic() - t
    return 100.0 * sum(b[p] - a.get(p, 0.0) for p in b) / dt


# --------------------------------------------------------------------------- bench

class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = dict(QUICK if args.quick else FULL)
        if args.reps:
            self.cfg["reps"] = args.reps
        if args.footprint_seconds is not None:
            self.cfg["footprint_cap"] = args.footprint_seconds
        self.reps = self.cfg["reps"]
        self.tmp = tempfile.mkdtemp(prefix="litetq-bench-", dir=args.dir)
        self.counter = 0
        self.load0 = _loadavg()
        self.procs = []
        self.results = []   # list of dicts (one JSON line each)
        self.notes = []
        with open(os.path.join(self.tmp, "benchtasks.py"), "w") as f:
            f.write(LITETQ_TASKS)
        for name, text in (("benchtasks_huey.py", HUEY_TASKS), ("benchtasks_flow.py", FLOW_TASKS),
                           ("benchtasks_async.py", ASYNC_TASKS), ("waiter.py", WAITER_SCRIPT),
                           ("benchtasks_procrastinate.py", PROCRASTINATE_TASKS)):
            with open(os.path.join(self.tmp, name), "w") as f:
                f.write(text)
        self.pg = None          # the PostgreSQL server, started by the first PG row
        sys.path.insert(0, self.tmp)
        sys.path.insert(0, REPO)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [self.tmp, REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        self.env.pop("LITETQ_DB", None)

        self.have_litetq = self.have_huey = False
        if not args.no_litetq:
            try:
                import litetq
                import benchtasks
                self.lt, self.ltt = litetq, benchtasks
                self.have_litetq = True
            except Exception as e:  # noqa: BLE001
                self.notes.append("litetq not benchmarked: import failed: %r" % (e,))
        if not args.no_huey:
            # the task module opens its SqliteHuey at import: point it into tmp
            os.environ["BENCH_HUEY_DB"] = os.path.join(self.tmp, "000-huey-import.sqlite")
            try:
                import huey
                import benchtasks_huey
                self.hu, self.hut = huey, benchtasks_huey
                self.huey_version = getattr(huey, "__version__", "?")
                self.have_huey = True
            except Exception as e:  # noqa: BLE001
                self.notes.append("Huey not benchmarked: import failed: %r (pip install huey)" % (e,))
        self.worker_sync_opt = None
        if self.have_litetq:
            self.worker_help = self._worker_help()
            if "--synchronous" in self.worker_help:
                self.worker_sync_opt = "--synchronous"

    # ------------------------------------------------------------ plumbing
    def fresh(self, tag):
        self.counter += 1
        p = os.path.join(self.tmp, "%03d-%s.sqlite" % (self.counter, tag))
        rm_db(p)
        return p

    def drop(self, path):
        if not self.args.keep:
            rm_db(path)

    def launch(self, cmd, tag):
        logf = open(os.path.join(self.tmp, "%03d-%s.log" % (self.counter, tag)), "ab")
        p = subprocess.Popen(cmd, cwd=self.tmp, env=self.env, stdout=logf,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        p._bench_log = logf
        p._bench_t0 = time.perf_counter()
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.returncode is None:
                self.stop(p, signal.SIGKILL, timeout=5)

    def stop(self, p, sig=signal.SIGTERM, timeout=40.0):
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.notes.append("process %d did not stop within %.0fs of %s; killed"
                                  % (p.pid, timeout, signal.Signals(sig).name))
        # Whatever is left of this child's own process group (its session).
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
        if not p._bench_log.closed:
            p._bench_log.close()

    def _worker_help(self):
        try:
            out = subprocess.run([sys.executable, "-m", "litetq", "worker", "--help"],
                                 cwd=self.tmp, env=self.env, capture_output=True,
                                 text=True, timeout=30)
            return out.stdout + out.stderr
        except Exception:  # noqa: BLE001
            return ""

    def lt_worker(self, db, conc, burst, sync="NORMAL", imports=("benchtasks",), extra=()):
        cmd = [sys.executable, "-m", "litetq", "worker", db, "--concurrency", str(conc),
               *extra, "--import", *imports]
        if burst:
            cmd.append("--burst")
        if sync == "FULL" and self.worker_sync_opt and not _is_url(db):
            cmd += [self.worker_sync_opt, sync]
        return self.launch(cmd, "litetq-worker")

    def huey_consumer(self, db, workers):
        env_db = self.env.get("BENCH_HUEY_DB")
        self.env["BENCH_HUEY_DB"] = db
        try:
            return self.launch([sys.executable, "-m", "huey.bin.huey_consumer",
                                "benchtasks_huey.huey", "-w", str(workers), "-k", "process"],
                               "huey-consumer")
        finally:
            if env_db is None:
                self.env.pop("BENCH_HUEY_DB", None)
            else:
                self.env["BENCH_HUEY_DB"] = env_db

    def lt_queue(self, db, sync="NORMAL"):
        q = self.lt.Queue(db) if _is_url(db) else self.lt.Queue(db, synchronous=sync)
        self.lt.use(q)
        return q

    def huey_at(self, db):
        h = self.hut.huey
        try:
            h.storage.close()
        except Exception:  # noqa: BLE001
            pass
        h.storage_kwargs["filename"] = db
        h.storage = h.create_storage()
        return h

    def huey_bulk(self, h, sigs):
        """Insert Huey messages exactly as huey.enqueue() would, in one transaction."""
        rows = [(h.storage.name, h.serialize_task(t), t.priority or 0) for t in sigs]
        with h.storage.db(commit=True) as curs:
            curs.executemany("insert into task (queue, data, priority) values (?, ?, ?)", rows)

    def variants(self, rep, with_full=True):
        vs = []
        if self.have_litetq:
            vs.append(("litetq", "NORMAL"))
        if self.have_huey:
            vs.append(("huey", "shipped"))
        if self.have_litetq and with_full:
            vs.append(("litetq", "FULL"))
        k = rep % len(vs) if vs else 0
        return vs[k:] + vs[:k]     # alternate who goes first

    def record(self, measurement, lib, sync, unit, values, **extra):
        r = {"measurement": measurement, "lib": lib, "synchronous": sync, "unit": unit,
             "values": [round(v, 6) if isinstance(v, float) else v for v in values],
             "median": median(values)}
        r.update(extra)
        self.results.append(r)
        log("%-28s %-7s %-8s median %s %s" % (measurement, lib, sync,
                                              _fmt(r["median"]), unit))
        return r

    def get(self, measurement, lib, sync):
        for r in self.results:
            if r["measurement"] == measurement and r["lib"] == lib and r["synchronous"] == sync:
                return r
        return None

    # ------------------------------------------------------------ settings
    def durability(self):
        d = {}
        if self.have_huey:
            db = self.fresh("huey-probe")
            h = self.huey_at(db)
            c = h.storage.conn
            jm = c.execute("pragma journal_mode").fetchone()[0]
            sy = c.execute("pragma synchronous").fetchone()[0]
            st = h.storage
            d["huey"] = ("SqliteHuey(filename=...) as shipped: journal_mode=%s, synchronous=%s "
                         "(fsync=%r -> SQLite default), cache_mb=%s, busy timeout %ss; "
                         "consumer -k process, polling initial 0.1s x1.15 up to 10s"
                         % (jm, {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(sy, sy),
                            st._fsync, st._cache_mb, st._timeout))
            h.storage.close()
            self.drop(db)
        if self.have_litetq:
            for sync in ("NORMAL", "FULL"):
                db = self.fresh("lt-probe")
                q = self.lt.Queue(db, synchronous=sync)
                q.stats()
                conns = _find_conns(q)
                got = []
                for c in conns:
                    try:
                        got.append("journal_mode=%s synchronous=%s" % (
                            c.execute("pragma journal_mode").fetchone()[0],
                            {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                                c.execute("pragma synchronous").fetchone()[0])))
                    except Exception:  # noqa: BLE001
                        pass
                d["litetq-" + sync] = "Queue(path, synchronous=%r): %s" % (
                    sync, got[0] if got else "(connection not found; per SPEC: WAL + %s)" % sync)
                q.close()
                self.drop(db)
            d["litetq worker"] = ("worker CLI: %s" % (
                "has %s; FULL rows use it" % self.worker_sync_opt if self.worker_sync_opt
                else "no synchronous option, workers run the default (NORMAL); "
                     "FULL applies to the producer side only"))
        self.settings = d

    # ------------------------------------------------------------ 1 enqueue
    def m_enqueue(self):
        n = self.cfg["enqueue_n"]
        vals = {}
        for rep in range(self.reps):
            for lib, sync in self.variants(rep):
                if lib == "litetq":
                    db = self.fresh("lt-enq")
                    q = self.lt_queue(db, sync)
                    noop = self.ltt.noop
                    for _ in range(10):
                        noop.delay()
                    t = time.perf_counter()
                    for _ in range(n):
                        noop.delay()
                    dt = time.perf_counter() - t
                    q.close()
                else:
                    db = self.fresh("huey-enq")
                    h = self.huey_at(db)
                    noop = self.hut.noop
                    for _ in range(10):
                        noop()
                    t = time.perf_counter()
                    for _ in range(n):
                        noop()
                    dt = time.perf_counter() - t
                    h.storage.close()
                self.drop(db)
                vals.setdefault((lib, sync), []).append(n / dt)
            if self.have_litetq:
                rate, kind = self.raw_insert_rate(n, one_txn=False)
                vals.setdefault(("raw-sqlite", "NORMAL"), []).append(rate)
        for (lib, sync), v in vals.items():
            self.record("enqueue", lib, sync, "jobs/s" if lib != "raw-sqlite" else "rows/s", v,
                        n=n, **({"row": kind, "how": "autocommit insert each"}
                                if lib == "raw-sqlite" else {}))

    # ------------------------------------------------------------ 2 enqueue_many
    def m_enqueue_many(self):
        if not self.have_litetq:
            return
        n = self.cfg["many_n"]
        lt_vals, raw_vals, raw_kind = [], [], None
        for rep in range(max(self.reps, 5)):
            order = ["litetq", "raw"] if rep % 2 == 0 else ["raw", "litetq"]
            for who in order:
                if who == "litetq":
                    db = self.fresh("lt-many")
                    q = self.lt_queue(db)
                    noop = self.ltt.noop
                    t = time.perf_counter()
                    q.enqueue_many([noop() for _ in range(n)])
                    dt = time.perf_counter() - t
                    q.close()
                    self.drop(db)
                    lt_vals.append(n / dt)
                else:
                    rate, raw_kind = self.raw_insert_rate(n)
                    raw_vals.append(rate)
        self.record("enqueue_many", "litetq", "NORMAL", "jobs/s", lt_vals, n=n)
        self.record("enqueue_many", "raw-sqlite", "NORMAL", "rows/s", raw_vals, n=n,
                    row=raw_kind)

    def _litetq_row_template(self):
        """The schema and the rows litetq writes for one enqueued job."""
        db = self.fresh("lt-schema")
        q = self.lt.Queue(db)
        c = sqlite3.connect(db)
        tables = [r[0] for r in c.execute(
            "select name from sqlite_master where type='table' and name not like 'sqlite_%'")]
        before = {t: c.execute('select count(*) from "%s"' % t).fetchone()[0] for t in tables}
        c.commit()
        q.enqueue_many([self.ltt.noop()])
        c2 = sqlite3.connect(db)
        rows = {}
        for t in tables:
            if c2.execute('select count(*) from "%s"' % t).fetchone()[0] > before[t]:
                cols = c2.execute('pragma table_info("%s")' % t).fetchall()
                pk = [col for col in cols if col[5]]
                row = c2.execute('select * from "%s" order by rowid desc limit 1' % t).fetchone()
                # Bind only what must be bound: drop the INTEGER PRIMARY KEY (SQLite
                # assigns it), NULLs, and values equal to the column's declared
                # default.  The stored row is identical; the insert is the leanest.
                keep_cols, keep_vals = [], []
                for col, val in zip(cols, row):
                    cid, name, ctype, notnull, dflt, is_pk = col
                    if is_pk and len(pk) == 1 and ctype.upper() == "INTEGER":
                        continue
                    if val is None:
                        continue
                    if dflt is not None:
                        try:
                            if c2.execute("select " + dflt).fetchone()[0] == val:
                                continue
                        except sqlite3.Error:
                            pass
                    keep_cols.append(name)
                    keep_vals.append(val)
                rows[t] = (keep_cols, keep_vals)
        schema = [r[0] for r in c2.execute(
            "select sql from sqlite_master where sql is not null and name not like 'sqlite_%' "
            "order by case type when 'table' then 0 when 'index' then 1 else 2 end")]
        c.close()
        c2.close()
        q.close()
        self.drop(db)
        return schema, rows

    def raw_insert_rate(self, n, one_txn=True):
        """Raw sqlite3: n job rows in one transaction, WAL + synchronous=NORMAL.

        The row is litetq's own: same schema, indexes and column values as the
        row(s) one enqueued no-op job writes, copied from a probe database.
        Falls back to a generic job table if that cannot be reproduced.
        """
        db = self.fresh("raw")
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("pragma journal_mode=wal")
        con.execute("pragma synchronous=NORMAL")
        try:
            if not hasattr(self, "_tmpl"):
                self._tmpl = self._litetq_row_template()
            schema, rows = self._tmpl
            if not rows:
                raise RuntimeError("no row found")
            for s in schema:
                con.execute(s)
            kind = "litetq schema: " + "; ".join(
                "%s(%s)" % (t, ", ".join(cols)) for t, (cols, _) in sorted(rows.items()))
            stmts = [('insert into "%s" (%s) values (%s)' % (
                t, ", ".join('"%s"' % c for c in cols), ", ".join("?" * len(cols))), row)
                for t, (cols, row) in rows.items()]
        except Exception as e:  # noqa: BLE001
            con.close()
            rm_db(db)
            con = sqlite3.connect(db, isolation_level=None)
            con.execute("pragma journal_mode=wal")
            con.execute("pragma synchronous=NORMAL")
            con.execute("create table job (id integer primary key, queue text not null, "
                        "task text not null, args text not null, status text not null, "
                        "priority integer not null, due real not null, created real not null, "
                        "attempts integer not null default 0)")
            con.execute("create index job_due on job (queue, status, priority desc, due, id)")
            stmts = [("insert into job (queue, task, args, status, priority, due, created) "
                      "values (?, ?, ?, ?, ?, ?, ?)",
                      ["default", "benchtasks.noop", "[[],{}]", "queued", 0, time.time(),
                       time.time()])]
            kind = "generic job table (%s)" % (e,)
        if one_txn:
            t = time.perf_counter()
            con.execute("begin")
            for sql, row in stmts:
                con.executemany(sql, [row] * n)
            con.execute("commit")
            dt = time.perf_counter() - t
        else:                       # one autocommit transaction per job
            for _ in range(10):
                for sql, row in stmts:
                    con.execute(sql, row)
            t = time.perf_counter()
            for _ in range(n):
                for sql, row in stmts:
                    con.execute(sql, row)
            dt = time.perf_counter() - t
        con.close()
        self.drop(db)
        return n / dt, kind

    # ------------------------------------------------------------ 3 end to end
    def m_e2e(self):
        n = self.cfg["e2e_n"]
        for conc in (1, 2):
            vals, mons = {}, {}
            for rep in range(self.reps):
                for lib, sync in self.variants(rep, with_full=bool(self.worker_sync_opt)):
                    if lib == "litetq":
                        v, mon = self._e2e_litetq(n, conc, sync)
                    else:
                        v, mon = self._e2e_huey(n, conc)
                    vals.setdefault((lib, sync), []).append(v)
                    mons.setdefault((lib, sync), []).append(mon)
            for (lib, sync), v in vals.items():
                peak = max((m.get("max_process_peak_mb") or 0) for m in mons[(lib, sync)])
                self.record("e2e_w%d" % conc, lib, sync, "jobs/s", v, n=n, workers=conc,
                            max_process_peak_mb=peak)

    def _e2e_litetq(self, n, conc, sync):
        db = self.fresh("lt-e2e")
        q = self.lt_queue(db, sync)
        q.enqueue_many([self.ltt.noop() for _ in range(n)])
        mon = Monitor(wal=db + "-wal")
        p = self.lt_worker(db, conc, burst=True, sync=sync)
        mon.set_root(p.pid)
        mon.start()
        try:
            rc = p.wait(60 + n / 200)
        except subprocess.TimeoutExpired:
            rc = None
        dt = time.perf_counter() - p._bench_t0
        mon.stop()
        self.stop(p)
        st = q.stats().get("default", {})
        q.close()
        self.drop(db)
        if rc != 0 or st.get("complete") != n:
            self.notes.append("e2e litetq w%d: exit %s, stats %s" % (conc, rc, st))
            return None, mon.summary()
        return n / dt, mon.summary()

    def _e2e_huey(self, n, conc):
        db = self.fresh("huey-e2e")
        h = self.huey_at(db)
        self.huey_bulk(h, [self.hut.noop.s() for _ in range(n)])
        sentinel = self.hut.done.s()
        self.huey_bulk(h, [sentinel])
        mon = Monitor(wal=db + "-wal")
        p = self.huey_consumer(db, conc)
        mon.set_root(p.pid)
        mon.start()
        deadline = time.monotonic() + 60 + n / 200
        ok = False
        while time.monotonic() < deadline and p.poll() is None:
            if h.get(sentinel.id, peek=True) is not None:
                ok = True
                break
            time.sleep(0.005)
        dt = time.perf_counter() - p._bench_t0
        mon.stop()
        self.stop(p)
        left = h.storage.queue_size()
        h.storage.close()
        self.drop(db)
        if not ok or left:
            self.notes.append("e2e huey w%d: finished=%s, left in queue %s" % (conc, ok, left))
            return None, mon.summary()
        return (n + 1) / dt, mon.summary()

    # ------------------------------------------------------------ 4 pick-up latency
    def m_pickup(self):
        n, gap = self.cfg["pickup_n"], self.cfg["pickup_gap"]
        out = {}
        # One idle worker per variant; each repetition is a batch of n jobs
        # after 0.25 s of idleness.  Variants alternate per repetition.
        for rep in range(self.reps):
            for lib, sync in self.variants(rep):
                lat = self._pickup_once(lib, sync, n, gap)
                out.setdefault((lib, sync), []).append(lat)
        for (lib, sync), reps in out.items():
            ok = [r for r in reps if r]
            p50 = [pct(r, 50) * 1000 for r in ok]
            p99 = [pct(r, 99) * 1000 for r in ok]
            self.record("pickup_p50", lib, sync, "ms", p50, n=n, gap_ms=gap * 1000)
            self.record("pickup_p99", lib, sync, "ms", p99, n=n, gap_ms=gap * 1000)

    def _pickup_once(self, lib, sync, n, gap):
        if lib == "litetq":
            db = self.fresh("lt-pickup")
            lat = self._lt_pickup(db, sync, n, gap)
        else:
            db = self.fresh("huey-pickup")
            h = self.huey_at(db)
            p = self.huey_consumer(db, 1)
            try:
                r = self.hut.tick()
                r.get(blocking=True, timeout=60)
                time.sleep(0.25)
                res = []
                t0 = time.time()
                for i in range(n):
                    _sleep_until(t0 + i * gap)
                    res.append(self.hut.stamp(time.time()))
                lat = []
                for r in res:
                    te, ts = r.get(blocking=True, timeout=60)
                    lat.append(ts - te)
            except Exception as e:  # noqa: BLE001
                self.notes.append("pickup huey: %r" % (e,))
                lat = None
            self.stop(p)
            h.storage.close()
        self.drop(db)
        return lat

    def _lt_pickup(self, db, sync, n, gap):
        """One idle worker process; n stamp() jobs enqueued gap apart: the latencies."""
        q = self.lt_queue(db, sync)
        p = self.lt_worker(db, 1, burst=False, sync=sync)
        try:
            self.ltt.noop.delay().result(timeout=60)      # worker is up
            time.sleep(0.25)
            jobs = []
            t0 = time.time()
            for i in range(n):
                _sleep_until(t0 + i * gap)
                jobs.append(self.ltt.stamp.delay(time.time()))
            lat = []
            for j in jobs:
                te, ts = j.result(timeout=60)
                lat.append(ts - te)
        except Exception as e:  # noqa: BLE001
            self.notes.append("pickup litetq %s: %r" % (sync, e))
            lat = None
        self.stop(p)
        q.close()
        return lat

    # ------------------------------------------------------------ 5+6 backlog, footprint
    def m_backlog(self):
        small, big = self.cfg["backlog_small"], self.cfg["backlog_big"]
        for lib in ("litetq", "huey"):
            if (lib == "litetq" and not self.have_litetq) or (lib == "huey" and not self.have_huey):
                continue
            sync = "NORMAL" if lib == "litetq" else "shipped"
            for level in (small, big):
                if level == big and lib == "huey" and not self.cfg["huey_big_backlog"]:
                    continue    # quick mode: building Huey's big backlog costs too much time
                rates, mon, extra = self._backlog_run(lib, level,
                                                      footprint=(lib == "litetq" and level == big))
                self.record("backlog_%d" % level, lib, sync, "jobs/s", rates, backlog=level,
                            workers=2, **mon, **extra)

    def _backlog_run(self, lib, level, footprint):
        """Sustained rate with `level` jobs queued: build the backlog, start a
        2-process worker (production mode, not --burst), keep the queue topped up
        to `level` from this process, and time consecutive windows of W jobs by
        the time.time() each tick() job returns.  Windows are the repetitions."""
        chunk = 10_000
        cfg = self.cfg
        if lib == "litetq":
            warm, win, nwin = cfg["backlog_warm"], cfg["backlog_window"], cfg["windows"]
        else:
            warm, win, nwin = cfg["huey_backlog_warm"], cfg["huey_backlog_window"], self.reps
        need = warm + win * nwin + 1          # indices whose ids we must know
        extra = {"window": win}
        tag = "lt" if lib == "litetq" else "huey"
        db = self.fresh("%s-backlog-%d" % (tag, level))
        mon = Monitor(wal=db + "-wal", interval=0.1)
        mon.start()
        ids = []

        if lib == "litetq":
            q = self.lt_queue(db)
            tick = self.ltt.tick

            def add(k):
                jobs = q.enqueue_many([tick() for _ in range(k)])
                if len(ids) < need + level:
                    ids.extend(j.id for j in jobs)

            def is_done(i):
                return q.job(ids[i]).done()

            def stamp(i):
                return q.job(ids[i]).result(timeout=10)

            def n_done(hint):
                return _first_not_done(ids, hint, lambda i: q.job(i).done())
        else:
            h = self.huey_at(db)
            tick = self.hut.tick

            def add(k):
                sigs = [tick.s() for _ in range(k)]
                self.huey_bulk(h, sigs)
                if len(ids) < need + level:
                    ids.extend(sg.id for sg in sigs)

            def is_done(i):
                return h.get(ids[i], peek=True) is not None

            def stamp(i):
                return h.get(ids[i], peek=True)

            def n_done(hint):
                return _first_not_done(ids, hint, lambda i: h.get(i, peek=True) is not None)

        total = [0]
        t = time.perf_counter()
        while total[0] < level:
            k = min(chunk, level - total[0])
            add(k)
            total[0] += k
        build = time.perf_counter() - t
        extra["build_s"] = round(build, 2)
        extra["build_rate"] = round(level / build)
        if level > 10_000:
            log("  %s backlog of %s built in %.1fs" % (lib, format(level, ","), build))

        p = (self.lt_worker(db, 2, burst=False) if lib == "litetq"
             else self.huey_consumer(db, 2))
        mon.set_root(p.pid)
        bounds = [warm + k * win for k in range(nwin + 1)]
        top_up = 500        # the same producer load at every level
        done = 0
        deadline = time.monotonic() + 60 + 3 * need / 500
        last_check = 0.0
        while p.poll() is None and time.monotonic() < deadline:
            now = time.monotonic()
            if now - last_check >= 0.01:
                last_check = now
                done = n_done(done)
                if done > bounds[-1] and is_done(bounds[-1]):
                    break
                while total[0] - done < level:      # keep `level` jobs queued
                    add(top_up)
                    total[0] += top_up
            time.sleep(0.002)
        if footprint:
            mon.mark()
            # keep this worker going to watch RSS and the WAL over many more jobs
            t_fp = time.monotonic()
            start = done
            while (time.monotonic() - t_fp < cfg["footprint_cap"] and p.poll() is None
                   and done - start < cfg["footprint_jobs"]):
                time.sleep(0.2)
                done = n_done(done)
            mon.sample()
        self.stop(p)
        rates = []
        try:
            ts = [stamp(i) for i in bounds]
            rates = [win / (tb - ta) for ta, tb in zip(ts, ts[1:])
                     if ta is not None and tb is not None and tb > ta]
        except Exception as e:  # noqa: BLE001
            self.notes.append("backlog %s %d: %r" % (lib, level, e))
        if footprint:
            extra["jobs_processed"] = n_done(done)
        mon.stop()
        summ = mon.summary()
        summ["wal_end_mb"] = round(fsize(db + "-wal") / 2**20, 1)   # parent still connected
        if lib == "litetq":
            q.close()
        else:
            h.storage.close()
        summ["db_mb"] = round(fsize(db) / 2**20, 1)
        self.drop(db)
        return rates, summ, extra

    # ------------------------------------------------------------ 7 continuations
    def m_continuations(self):
        for rep in range(self.reps):
            for lib, sync in self.variants(rep, with_full=False):
                v = self._countdown(lib)
                self._cd.setdefault(lib, []).append(v)
        for lib, v in self._cd.items():
            n = self.cfg["countdown_n"] if lib == "litetq" else self.cfg["countdown_n_huey"]
            self.record("countdown", lib, "NORMAL" if lib == "litetq" else "shipped",
                        "steps/s", v, steps=n,
                        how=("continuations of one job" if lib == "litetq"
                             else "task re-enqueues itself (Huey has no continuations)"))

    _cd = {}

    def _countdown(self, lib):
        if lib == "litetq":
            n = self.cfg["countdown_n"]
            db = self.fresh("lt-countdown")
            q = self.lt_queue(db)
            job = self.ltt.countdown.delay(n)
            # not --burst: the supervisor must not see "nothing due" between two steps
            p = self.lt_worker(db, 1, burst=False)
            try:
                t0, t1 = job.result(timeout=300)
                v = n / (t1 - t0)
            except Exception as e:  # noqa: BLE001
                self.notes.append("countdown litetq: %r" % (e,))
                v = None
            self.stop(p)
            q.close()
        else:
            n = self.cfg["countdown_n_huey"]
            db = self.fresh("huey-countdown")
            h = self.huey_at(db)
            self.hut.countdown(n)
            p = self.huey_consumer(db, 1)
            v = None
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and p.poll() is None:
                r = h.get("countdown", peek=True)
                if r:
                    v = n / (r[1] - r[0])
                    break
                time.sleep(0.02)
            self.stop(p)
            h.storage.close()
        self.drop(db)
        return v

    # ------------------------------------------------------------ 8 PostgreSQL
    # litetq on PostgreSQL (lib "litetq-pg") against procrastinate on the same
    # server, in the same run; a fresh database for every measurement.
    def pg_server(self):
        if self.pg is None:
            if getattr(self, "pg_error", None):
                raise RuntimeError("no PostgreSQL server: %s" % self.pg_error)
            log("starting PostgreSQL")
            try:
                self.pg = PgServer(self.args.dir)
            except Exception as e:  # noqa: BLE001
                self.pg_error = repr(e)
                raise
            self.settings["postgres"] = "%s: %s" % (self.pg.how, self.pg.settings)
        return self.pg

    def pg_libs(self, rep):
        libs = ["litetq-pg"]
        if not self.args.no_procrastinate:
            try:
                import procrastinate  # noqa: F401
                libs.append("procrastinate")
            except ImportError:
                note = "procrastinate not importable: the PG rows show litetq only"
                if note not in self.notes:
                    self.notes.append(note)
        k = rep % len(libs)
        return libs[k:] + libs[:k]      # alternate who goes first

    def pr_app(self, url):
        """A procrastinate App on `url`, opened synchronously, its schema applied.  The
        producer defers by task name (app.configure_task(name=...)), as documented for
        code that does not import the tasks; the worker imports them."""
        import logging
        import procrastinate
        # Its warning that the App is made in __main__ concerns task discovery: the
        # producer registers no task here.
        logging.getLogger("procrastinate").setLevel(logging.ERROR)
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
        app.open()
        app.schema_manager.apply_schema()
        return app

    def pr_worker(self, url, conc, wait, tag="procrastinate-worker"):
        """`procrastinate worker`, the documented CLI; --one-shot exits when the queue is empty."""
        env_dsn = self.env.get("BENCH_PROCRASTINATE_DSN")
        self.env["BENCH_PROCRASTINATE_DSN"] = url
        try:
            return self.launch([sys.executable, "-m", "procrastinate", "--app",
                                "benchtasks_procrastinate.app", "worker", "--concurrency",
                                str(conc), "--wait" if wait else "--one-shot"], tag)
        finally:
            if env_dsn is None:
                self.env.pop("BENCH_PROCRASTINATE_DSN", None)
            else:
                self.env["BENCH_PROCRASTINATE_DSN"] = env_dsn

    def pr_counts(self, url):
        return dict(self.pg.sql("select status::text, count(*) from procrastinate_jobs "
                                "group by status", url))

    def m_pg_enqueue(self, bulk=False):
        pg = self.pg_server()
        n = self.cfg["pg_many_n" if bulk else "pg_enqueue_n"]
        vals = {}
        for rep in range(self.reps):
            for lib in self.pg_libs(rep):
                url = pg.database(lib)
                if lib == "litetq-pg":
                    q = self.lt_queue(url)
                    noop = self.ltt.noop
                    for _ in range(10):
                        noop.delay()
                    t = time.perf_counter()
                    if bulk:
                        q.enqueue_many([noop() for _ in range(n)])
                    else:
                        for _ in range(n):
                            noop.delay()
                    dt = time.perf_counter() - t
                    q.close()
                else:
                    app = self.pr_app(url)
                    for _ in range(10):
                        app.configure_task(name="noop").defer()
                    t = time.perf_counter()
                    if bulk:
                        app.configure_task(name="noop").batch_defer(*[{} for _ in range(n)])
                    else:
                        for _ in range(n):
                            app.configure_task(name="noop").defer()
                    dt = time.perf_counter() - t
                    app.close()
                pg.drop(url)
                vals.setdefault(lib, []).append(n / dt)
        for lib, v in vals.items():
            self.record("pg_many" if bulk else "pg_enqueue", lib, "server", "jobs/s", v, n=n,
                        how=("enqueue_many / batch_defer, one call" if bulk
                             else ".delay() / .defer() each"))

    def m_pg_many(self):
        self.m_pg_enqueue(bulk=True)

    def m_pg_e2e(self):
        pg = self.pg_server()
        n = self.cfg["pg_e2e_n"]
        for conc in (1, 2):
            vals = {}
            for rep in range(self.reps):
                for lib in self.pg_libs(rep):
                    url = pg.database(lib)
                    if lib == "litetq-pg":
                        v = self._lt_drain(url, self.ltt.noop, n, conc)
                    else:
                        v = self._pr_drain(url, n, conc)
                    pg.drop(url)
                    vals.setdefault(lib, []).append(v)
            for lib, v in vals.items():
                self.record("pg_e2e_w%d" % conc, lib, "server", "jobs/s", v, n=n,
                            worker_processes=conc)

    def _lt_drain(self, db, task, n, conc, imports=("benchtasks",), label=None, burst=True):
        """n queued task() jobs drained by `worker --burst --concurrency conc`: jobs/s
        from the worker's launch to its exit; None (and a note) unless all complete.
        burst=False: a worker in production mode, timed from its launch until this
        process sees all n complete (looking every 20 ms)."""
        q = self.lt_queue(db)
        q.enqueue_many([task() for _ in range(n)])
        p = self.lt_worker(db, conc, burst=burst, imports=imports)
        rc = 0
        if burst:
            try:
                rc = p.wait(120 + n / 20)
            except subprocess.TimeoutExpired:
                rc = None
        else:
            deadline = time.monotonic() + 120 + n / 20
            while (p.poll() is None and time.monotonic() < deadline and
                   sum(st.get("complete", 0) for st in q.stats().values()) < n):
                time.sleep(0.02)
        dt = time.perf_counter() - p._bench_t0
        self.stop(p)
        done = sum(st.get("complete", 0) for st in q.stats().values())
        q.close()
        if rc != 0 or done != n:
            self.notes.append("%s: worker exit %s, %d of %d complete" % (
                label or "drain %s" % getattr(task, "name", task), rc, done, n))
            return None
        return n / dt

    def _pr_drain(self, url, n, conc):
        app = self.pr_app(url)
        app.configure_task(name="noop").batch_defer(*[{} for _ in range(n)])
        app.close()
        procs = [self.pr_worker(url, 1, wait=False) for _ in range(conc)]
        rcs = []
        for p in procs:
            try:
                rcs.append(p.wait(120 + n / 20))
            except subprocess.TimeoutExpired:
                rcs.append(None)
        dt = time.perf_counter() - procs[0]._bench_t0
        for p in procs:
            self.stop(p)
        counts = self.pr_counts(url)
        if any(rc != 0 for rc in rcs) or counts.get("succeeded") != n:
            self.notes.append("e2e procrastinate x%d: exits %s, jobs %s" % (conc, rcs, counts))
            return None
        return n / dt

    def m_pg_pickup(self):
        pg = self.pg_server()
        n, gap = self.cfg["pg_pickup_n"], self.cfg["pickup_gap"]
        out = {}
        for rep in range(self.reps):
            for lib in self.pg_libs(rep):
                url = pg.database(lib)
                if lib == "litetq-pg":
                    lat = self._lt_pickup(url, "server", n, gap)
                else:
                    lat = self._pr_pickup(url, n, gap)
                pg.drop(url)
                out.setdefault(lib, []).append(lat)
        for lib, reps in out.items():
            ok = [r for r in reps if r]
            self.record("pg_pickup_p50", lib, "server", "ms", [pct(r, 50) * 1000 for r in ok],
                        n=n, gap_ms=gap * 1000)
            self.record("pg_pickup_p99", lib, "server", "ms", [pct(r, 99) * 1000 for r in ok],
                        n=n, gap_ms=gap * 1000)

    def _pr_pickup(self, url, n, gap):
        stamps = os.path.join(self.tmp, "stamps-%d.txt" % self.counter)
        self.env["BENCH_STAMPS"] = stamps
        app = self.pr_app(url)
        stamp = app.configure_task(name="stamp")
        p = self.pr_worker(url, 1, wait=True)
        lat = None
        try:
            stamp.defer(t_enq=time.time())
            _wait_lines(stamps, 1, 60)                    # worker is up
            time.sleep(0.25)
            os.remove(stamps)
            t0 = time.time()
            for i in range(n):
                _sleep_until(t0 + i * gap)
                stamp.defer(t_enq=time.time())
            lines = _wait_lines(stamps, n, 60)
            lat = [float(b) - float(a) for a, b in (ln.split() for ln in lines)]
        except Exception as e:  # noqa: BLE001
            self.notes.append("pickup procrastinate: %r" % (e,))
        self.stop(p)
        app.close()
        return lat

    def m_pg_countdown(self):
        pg = self.pg_server()
        n = self.cfg["pg_countdown_n"]
        vals = []
        for rep in range(self.reps):
            url = pg.database("lt-countdown")
            vals.append(self._lt_countdown(url, n))
            pg.drop(url)
        self.record("pg_countdown", "litetq-pg", "server", "steps/s", vals, steps=n,
                    how="continuations of one job, worker --concurrency 1")

    def _lt_countdown(self, db, n):
        q = self.lt_queue(db)
        job = self.ltt.countdown.delay(n)
        p = self.lt_worker(db, 1, burst=False)   # not --burst: see m_continuations
        try:
            t0, t1 = job.result(timeout=300)
            v = n / (t1 - t0)
        except Exception as e:  # noqa: BLE001
            self.notes.append("countdown %s: %r" % ("PG" if _is_url(db) else "SQLite", e))
            v = None
        self.stop(p)
        q.close()
        return v

    # ------------------------------------------------------------ 9 flow control
    def backends(self):
        """(lib label, fresh database) makers for the rows run on SQLite and PG."""
        out = [("litetq", lambda tag: self.fresh(tag), self.drop)]
        if not self.args.no_postgres:
            try:
                pg = self.pg_server()
                out.append(("litetq-pg", pg.database, pg.drop))
            except Exception as e:  # noqa: BLE001
                self.notes.append("PostgreSQL rows skipped: %r" % (e,))
                self.args.no_postgres = True
        return out

    def flow_tasks(self):
        import benchtasks_flow
        return benchtasks_flow

    def m_flow_e2e(self):
        ft = self.flow_tasks()
        n = self.cfg["flow_n"]
        kinds = [("free", ft.free), ("capped", ft.capped), ("paced", ft.paced)]
        for lib, make_db, drop in self.backends():
            vals = {}
            for rep in range(self.reps):
                k = rep % len(kinds)
                for kind, task in kinds[k:] + kinds[:k]:
                    db = make_db("flow-" + kind)
                    # Not --burst: a burst worker exits when nothing may start now, and
                    # steps held back by the rate limit are not "due" for it.
                    vals.setdefault(kind, []).append(self._lt_drain(
                        db, task, n, 2, imports=("benchtasks_flow",), burst=False,
                        label="flow %s %s" % (lib, kind)))
                    drop(db)
            for kind, v in vals.items():
                self.record("flow_e2e_" + kind, lib, _sync_of(lib), "jobs/s", v, n=n,
                            worker_processes=2)

    def m_flow_idle(self):
        """An idle worker process next to one that holds gate()'s only slot, with
        (held) or without (empty) held_n gate() steps queued ahead of everything:
        its CPU while nothing may run, then the pick-up latency of held_runnable
        stamp2() jobs enqueued behind the held-back ones, 20 ms apart."""
        ft = self.flow_tasks()
        c = self.cfg
        for lib, make_db, drop in self.backends():
            cpu, p50, p99, quiet = {}, {}, {}, {}
            for rep in range(self.reps):
                for variant in (("empty", "held") if rep % 2 == 0 else ("held", "empty")):
                    db = make_db("flow-idle-" + variant)
                    r = self._held_once(db, ft, c["held_n"] if variant == "held" else 0)
                    drop(db)
                    if r:
                        cpu.setdefault(variant, []).append(r[0])
                        p50.setdefault(variant, []).append(pct(r[1], 50) * 1000)
                        p99.setdefault(variant, []).append(pct(r[1], 99) * 1000)
                        quiet.setdefault(variant, []).append(r[2])
            for variant in ("empty", "held"):
                held = c["held_n"] if variant == "held" else 0
                self.record("held_quiet_" + variant, lib, _sync_of(lib), "s",
                            quiet.get(variant, []), held_back=held,
                            how="gate running until the worker uses < 10% of a core "
                                "in two 0.5 s windows in a row")
                self.record("held_cpu_" + variant, lib, _sync_of(lib), "% of a core",
                            cpu.get(variant, []), held_back=held, seconds=c["idle_s"])
                self.record("held_p50_" + variant, lib, _sync_of(lib), "ms",
                            p50.get(variant, []), held_back=held, n=c["held_runnable"])
                self.record("held_p99_" + variant, lib, _sync_of(lib), "ms",
                            p99.get(variant, []), held_back=held, n=c["held_runnable"])

    def _held_once(self, db, ft, held):
        c = self.cfg
        gap = self.cfg["pickup_gap"]
        q = self.lt_queue(db)
        hold = 60 + c["idle_s"] + c["held_runnable"] * gap * 10   # outlasts the measurement
        gate = ft.gate.delay(hold)
        if held:
            q.enqueue_many([ft.gate() for _ in range(held)])
        p = self.lt_worker(db, 2, burst=False, imports=("benchtasks_flow",))
        out = None
        try:
            deadline = time.monotonic() + 60
            while gate.status != "running":
                if time.monotonic() > deadline or p.poll() is not None:
                    raise RuntimeError("the gate step never started")
                time.sleep(0.02)
            # The first claims park the held-back steps (once, a batch per claim); wait
            # until the worker is quiet (under 10 % of a core in two 0.5 s windows in a
            # row), for at most 30 s.
            t_quiet, quiet = time.monotonic(), 0
            while quiet < 2 and time.monotonic() - t_quiet < 30:
                quiet = quiet + 1 if cpu_percent(p.pid, 0.5) < 10 else 0
            settle = time.monotonic() - t_quiet
            load = cpu_percent(p.pid, c["idle_s"])
            lat = []
            for _ in range(c["held_runnable"]):
                te = time.time()
                t_enq, t_start = ft.stamp2.delay(te).result(timeout=30)
                lat.append(t_start - t_enq)
                time.sleep(gap)
            queued = sum(st.get("queued", 0) for st in q.stats().values())
            if gate.status != "running" or queued != held:
                ran = {s: len(q.jobs(status=s, task=ft.gate.name, limit=held + 1))
                       for s in ("running", "complete", "failed")}
                raise RuntimeError("the gate step is %s (attempt %s), %d steps queued "
                                   "(expected %d); gate() steps by status: %s" % (
                                       gate.status, gate.attempts, queued, held, ran))
            out = (load, lat, settle)
        except Exception as e:  # noqa: BLE001
            self.notes.append("held-back %s (%d held): %r" % (db, held, e))
        self.stop(p, signal.SIGKILL, timeout=5)     # the gate step would hold on for `hold`
        q.close()
        return out

    # ------------------------------------------------------------ 10 asyncio
    def async_tasks(self):
        import benchtasks_async
        return benchtasks_async

    def m_async_sleep(self):
        at = self.async_tasks()
        c = self.cfg
        vals = []
        for rep in range(self.reps):
            db = self.fresh("async-sleep")
            vals.append(self._wall(db, at.anap, c["async_sleep_n"], (0.1,)))
            self.drop(db)
        self.record("sleep_async", "litetq", "NORMAL", "s", vals, n=c["async_sleep_n"],
                    how="await asyncio.sleep(0.1), worker --concurrency 1, default "
                        "--async-concurrency; launch to exit")
        # Sleep-bound (n x 0.1 s): one run is enough, noise is small against it.
        db = self.fresh("sync-sleep")
        self.record("sleep_sync", "litetq", "NORMAL", "s",
                    [self._wall(db, at.snap, c["sync_sleep_n"], (0.1,))], n=c["sync_sleep_n"],
                    how="time.sleep(0.1), worker --concurrency 1; launch to exit; one run")
        self.drop(db)

    def _wall(self, db, task, n, args):
        rate = self._lt_drain(db, lambda: task(*args), n, 1, imports=("benchtasks_async",),
                              label="%s x %d" % (task.name, n))
        return n / rate if rate else None

    def m_async_noop(self):
        at = self.async_tasks()
        n = self.cfg["noop_steps_n"]
        vals = {}
        for rep in range(self.reps):
            order = [("async", at.atick), ("sync", at.stick)]
            for kind, task in order if rep % 2 == 0 else order[::-1]:
                db = self.fresh("noop-" + kind)
                q = self.lt_queue(db)
                jobs = q.enqueue_many([task() for _ in range(n)])
                p = self.lt_worker(db, 1, burst=True, imports=("benchtasks_async",))
                v = None
                try:
                    p.wait(120 + n / 20)
                    ts = [j.result(timeout=5) for j in jobs]
                    v = (n - 1) / (max(ts) - min(ts))
                except Exception as e:  # noqa: BLE001
                    self.notes.append("no-op %s steps: %r" % (kind, e))
                self.stop(p)
                q.close()
                self.drop(db)
                vals.setdefault(kind, []).append(v)
        for kind, v in vals.items():
            self.record("noop_steps_" + kind, "litetq", "NORMAL", "steps/s", v, n=n,
                        how="first to last step, timed inside the tasks; worker --concurrency 1")

    def m_async_wait(self):
        self.async_tasks()
        c = self.cfg
        n = c["waiters_n"]
        cpu, p50, p99 = [], [], []
        for rep in range(self.reps):
            db = self.fresh("waiters")
            go = os.path.join(self.tmp, "go-%d" % self.counter)
            w = self.launch([sys.executable, "waiter.py", db, str(n), str(c["idle_s"]), go],
                            "waiter")
            p = None
            try:
                deadline = time.monotonic() + 120
                while not os.path.exists(go):
                    if time.monotonic() > deadline or w.poll() is not None:
                        raise RuntimeError("the waiter did not get ready")
                    time.sleep(0.05)
                p = self.lt_worker(db, 1, burst=True, imports=("benchtasks_async",))
                w.wait(120 + n / 20)
                with open(os.path.join(self.tmp, "%03d-waiter.log" % self.counter)) as f:
                    res = json.loads([ln for ln in f if ln.startswith("{")][-1])
                lat = res["lat"]
                cpu.append(100 * res["idle_cpu"])
                p50.append(pct(lat, 50) * 1000)
                p99.append(pct(lat, 99) * 1000)
            except Exception as e:  # noqa: BLE001
                self.notes.append("%d awaiters: %r" % (n, e))
            for proc in (w, p):
                if proc:
                    self.stop(proc)
            self.drop(db)
        extra = dict(n=n, how="asyncio.gather of job.aresult() in one process")
        self.record("await_cpu", "litetq", "NORMAL", "% of a core", cpu, seconds=c["idle_s"],
                    **extra)
        self.record("await_p50", "litetq", "NORMAL", "ms", p50, **extra)
        self.record("await_p99", "litetq", "NORMAL", "ms", p99, **extra)

    # ------------------------------------------------------------ 11 retention soak
    def m_soak(self):
        """soak_n no-op jobs through a 2-process worker with --keep complete=5s,
        the producer keeping about 20,000 queued; the database file and WAL sizes
        every soak_every seconds.  Once jobs start to age out they must level off."""
        c = self.cfg
        n, every, keep = c["soak_n"], c["soak_every"], 5
        db = self.fresh("soak")
        q = self.lt_queue(db)
        p = self.lt_worker(db, 2, burst=False, extra=("--keep", "complete=%ds" % keep))
        series, total, left, t0 = [], 0, None, time.monotonic()
        log("  soak: %s jobs, --keep complete=%ds" % (format(n, ","), keep))

        def counts():
            out = {}
            for per_queue in q.stats().values():
                for status, k in per_queue.items():
                    out[status] = out.get(status, 0) + k
            return out

        def sample(rows, why=""):
            series.append(dict(t=round(time.monotonic() - t0, 1), enqueued=total,
                               done=total - left, rows=rows,
                               db_mb=round(fsize(db) / 2**20, 1),
                               wal_mb=round(fsize(db + "-wal") / 2**20, 1)))
            log("  soak %(t)6.1fs  done %(done)9d  rows %(rows)7d  db %(db_mb)6.1f MB"
                "  wal %(wal_mb)5.1f MB" % series[-1] + why)

        try:
            next_sample = t0
            while p.poll() is None and time.monotonic() - t0 < 120 + n / 200:
                st = counts()
                left = st.get("queued", 0) + st.get("running", 0)
                if time.monotonic() >= next_sample or (total >= n and not left):
                    sample(sum(st.values()))
                    next_sample = time.monotonic() + every
                if total >= n and not left:
                    break
                while total < n and left < 20_000:
                    k = min(5_000, n - total)
                    q.enqueue_many([self.ltt.noop() for _ in range(k)])
                    total += k
                    left += k
                time.sleep(0.1)
            time.sleep(keep + 2)            # one keep period more: the last jobs age out too
            sample(sum(counts().values()), " (one keep period later)")
        except Exception as e:  # noqa: BLE001
            self.notes.append("soak: %r" % (e,))
        self.stop(p)
        q.close()
        self.drop(db)
        if total < n or left:
            self.notes.append("soak: %d of %d enqueued, %s left unfinished" % (total, n, left))
        two_thirds = [s for s in series if s["done"] >= 2 * n / 3]
        purge_rate = None
        if len(series) >= 2 and series[-1]["t"] > series[-2]["t"]:
            purge_rate = (series[-2]["rows"] - series[-1]["rows"]) / (
                series[-1]["t"] - series[-2]["t"])
        last_job = series[-2] if len(series) >= 2 else None    # when the last job was done
        self.record("soak", "litetq", "NORMAL", "MB", [s["db_mb"] for s in series], n=n,
                    keep="complete=%ds" % keep, keep_s=keep, series=series,
                    purge_rate=purge_rate,
                    t_last_job=last_job["t"] if last_job else None,
                    rows_two_thirds=two_thirds[0]["rows"] if two_thirds else None,
                    rows_last_job=last_job["rows"] if last_job else None,
                    db_mb_two_thirds=two_thirds[0]["db_mb"] if two_thirds else None,
                    db_mb_max=max((s["db_mb"] for s in series), default=None),
                    wal_mb_max=max((s["wal_mb"] for s in series), default=None),
                    db_mb_end=series[-1]["db_mb"] if series else None,
                    rows_end=series[-1]["rows"] if series else None)

    # ------------------------------------------------------------ report
    def report(self, wall):
        g = self.get

        def m(meas, lib, sync):
            r = g(meas, lib, sync)
            return r["median"] if r else None

        def ratio(a, b):
            return a / b if a is not None and b else None

        rows = []   # (label, ltN, ltF, huey, ratio, target, verdict)

        def verdict(ok):
            return "" if ok is None else ("PASS" if ok else "MISS")

        # 1 enqueue
        a, f, h = m("enqueue", "litetq", "NORMAL"), m("enqueue", "litetq", "FULL"), m("enqueue", "huey", "shipped")
        r = ratio(a, h)
        rows.append(("1 enqueue, .delay() each (jobs/s)", a, f, h, r, ">= 4x Huey",
                     verdict(r >= 4 if r is not None else None)))
        raw1 = m("enqueue", "raw-sqlite", "NORMAL")
        rows.append(("  raw sqlite3 autocommit insert (rows/s)", raw1, None, None, ratio(a, raw1),
                     "ceiling (ratio: litetq/raw)", ""))
        # 2 enqueue_many
        a, raw = m("enqueue_many", "litetq", "NORMAL"), m("enqueue_many", "raw-sqlite", "NORMAL")
        r = ratio(a, raw)
        rows.append(("2 enqueue_many (jobs/s)", a, None, None, None, "", ""))
        rows.append(("  raw sqlite3, 1 txn (rows/s)", raw, None, None, r,
                     ">= 0.5x raw (ratio: litetq/raw)", verdict(r >= 0.5 if r is not None else None)))
        # 3 e2e
        for conc in (1, 2):
            meas = "e2e_w%d" % conc
            a, f, h = m(meas, "litetq", "NORMAL"), m(meas, "litetq", "FULL"), m(meas, "huey", "shipped")
            r = ratio(a, h)
            tgt = ">= 4x Huey" if conc == 2 else ""
            rows.append(("3 end to end, %d worker%s (jobs/s)" % (conc, "s" if conc > 1 else ""),
                         a, f, h, r, tgt, verdict(r >= 4 if (r is not None and conc == 2) else None)))
        # 4 pickup
        for p_, lim in (("p50", 2.0), ("p99", 10.0)):
            meas = "pickup_" + p_
            a, f, h = m(meas, "litetq", "NORMAL"), m(meas, "litetq", "FULL"), m(meas, "huey", "shipped")
            rows.append(("4 pick-up latency %s (ms)" % p_, a, f, h, ratio(a, h),
                         "<= %g ms" % lim, verdict(a <= lim if a is not None else None)))
        # 5 backlog
        small, big = self.cfg["backlog_small"], self.cfg["backlog_big"]
        rs, rb = g("backlog_%d" % small, "litetq", "NORMAL"), g("backlog_%d" % big, "litetq", "NORMAL")
        hs, hb = g("backlog_%d" % small, "huey", "shipped"), g("backlog_%d" % big, "huey", "shipped")
        for lbl, rl, rh in ((small, rs, hs), (big, rb, hb)):
            a = rl["median"] if rl else None
            h = rh["median"] if rh else None
            rows.append(("5 backlog %s queued, 2 workers (jobs/s)" % format(lbl, ","), a, None, h,
                         ratio(a, h), "", ""))
        keep = ratio(rb["median"] if rb else None, rs["median"] if rs else None)
        hkeep = ratio(hb["median"] if hb else None, hs["median"] if hs else None)
        rows.append(("  rate at %s / rate at %s" % (format(big, ","), format(small, ",")),
                     keep, None, hkeep, None, ">= 0.8",
                     verdict(keep >= 0.8 if keep is not None else None)))
        # 6 footprint
        if rb:
            peak = max(x or 0 for x in (rb.get("supervisor_peak_mb"), rb.get("worker_peak_mb"),
                                        rs.get("supervisor_peak_mb") if rs else 0,
                                        rs.get("worker_peak_mb") if rs else 0))
        else:
            peak = None
        hpeak = hb.get("max_process_peak_mb") if hb else None
        rows.append(("6 peak RSS, supervisor (MB)", rb and rb.get("supervisor_peak_mb"), None,
                     hb and hb.get("supervisor_peak_mb"), None, "", ""))
        rows.append(("  peak RSS, each worker (MB)", rb and rb.get("worker_peak_mb"), None,
                     hb and hb.get("worker_peak_mb"), None, "", ""))
        rows.append(("  max process peak RSS (MB)", peak, None, hpeak, None, "<= 30 MB",
                     verdict(peak <= 30 if peak else None)))
        gr = rb.get("rss_growth_mb") if rb else None
        rows.append(("  RSS growth, %s jobs (MB)" % (
            format(rb.get("jobs_processed"), ",") if rb and rb.get("jobs_processed") else "?"),
            gr, None, None, None, "no growth (<= 2 MB)",
            verdict(gr <= 2 if gr is not None else None)))
        wal = rb.get("wal_max_mb") if rb else None
        rows.append(("  WAL max, %s-job run (MB)" % format(big, ","), wal, None,
                     hb and hb.get("wal_max_mb"), None, "< 64 MB",
                     verdict(wal < 64 if wal is not None else None)))
        rows.append(("  WAL after the run (MB)", rb and rb.get("wal_end_mb"), None,
                     hb and hb.get("wal_end_mb"), None, "", ""))
        # 7 countdown
        a, h = m("countdown", "litetq", "NORMAL"), m("countdown", "huey", "shipped")
        rows.append(("7 countdown trampoline (steps/s)", a, None, h, ratio(a, h), "", ""))

        out = []
        w = out.append
        w("litetq benchmark, %s" % datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))
        w("machine: %s, %d cores, %s; Python %s; SQLite %s; huey %s" % (
            _cpu(), os.cpu_count(), platform.platform(), platform.python_version(),
            sqlite3.sqlite_version, getattr(self, "huey_version", "-")))
        w("litetq %s, %s" % (getattr(self.lt, "__version__", "?") if self.have_litetq else "-",
                             _git_rev()))
        w("mode: %s, %d repetitions (median shown), temp folder %s" % (
            "quick" if self.args.quick else "full", self.reps, self.tmp))
        w("load average at start %s, at end %s (other processes on this machine add noise)" % (
            self.load0, _loadavg()))
        for k, v in getattr(self, "settings", {}).items():
            w("durability %-14s %s" % (k + ":", v))
        if any(r["measurement"] in HUEY_TABLE for r in self.results):
            w("")
            w("SQLite: litetq vs Huey (SqliteHuey)")
            _table(w, ("measurement", "litetq NORMAL", "litetq FULL", "Huey", "litetq/Huey",
                       "target", ""), (42, 14, 12, 12, 12, 32, 4), rows)
            w("Ratios are litetq (NORMAL) / Huey; for latencies lower is better.  "
              "'litetq FULL' = Queue(..., synchronous=\"FULL\").")
        self.report_pg(w)
        self.report_flow(w)
        self.report_async(w)
        self.report_soak(w)
        w("")
        w("wall time: %.1f s" % wall)
        for n in self.notes:
            w("note: " + n)
        print("\n".join(out))
        for r in self.results:
            print(json.dumps(r, sort_keys=True))
        sys.stdout.flush()

    def med(self, meas, lib, sync=None):
        r = self.get(meas, lib, sync or _sync_of(lib))
        return r["median"] if r else None

    def report_pg(self, w):
        m = self.med
        if not any(r["measurement"].startswith("pg_") for r in self.results):
            return
        rows = []
        for label, meas in (("enqueue, one call each (jobs/s)", "pg_enqueue"),
                            ("bulk enqueue, one call (jobs/s)", "pg_many"),
                            ("end to end, 1 worker process (jobs/s)", "pg_e2e_w1"),
                            ("end to end, 2 worker processes (jobs/s)", "pg_e2e_w2"),
                            ("pick-up latency p50 (ms)", "pg_pickup_p50"),
                            ("pick-up latency p99 (ms)", "pg_pickup_p99")):
            a, b = m(meas, "litetq-pg"), m(meas, "procrastinate", "server")
            rows.append((label, a, b, _ratio(a, b)))
        rows.append(("countdown continuations (steps/s)", m("pg_countdown", "litetq-pg"),
                     None, None))
        w("")
        w("PostgreSQL: litetq vs procrastinate %s, same server, same run"
          % _version("procrastinate"))
        _table(w, ("measurement", "litetq", "procrastinate", "litetq/procr."),
               (42, 14, 14, 14), rows)
        w("litetq: enqueue_many / `worker URL --burst --concurrency N`; procrastinate: "
          "batch_defer / N x `procrastinate worker --concurrency 1 --one-shot`.")
        w("End to end: launch to exit of the workers, start-up included.  Pick-up: an idle "
          "worker (procrastinate: --wait, LISTEN/NOTIFY on).")

    def report_flow(self, w):
        m = self.med
        if not any(r["measurement"].startswith(("flow_", "held_")) for r in self.results):
            return
        n, held, k = self.cfg["flow_n"], self.cfg["held_n"], self.cfg["held_runnable"]
        hs = format(held, ",")
        rows = []
        for label, meas in (("end to end, no limit (jobs/s)", "flow_e2e_free"),
                            ("end to end, concurrency=4 (jobs/s)", "flow_e2e_capped"),
                            ('end to end, rate="1000/s" (jobs/s)', "flow_e2e_paced"),
                            ("worker quiet after, nothing held (s)", "held_quiet_empty"),
                            ("worker quiet after, %s held (s)" % hs, "held_quiet_held"),
                            ("idle worker CPU, nothing held back (%)", "held_cpu_empty"),
                            ("idle worker CPU, %s held back (%%)" % hs, "held_cpu_held"),
                            ("claim latency p50, nothing held (ms)", "held_p50_empty"),
                            ("claim latency p50, %s held (ms)" % hs, "held_p50_held"),
                            ("claim latency p99, nothing held (ms)", "held_p99_empty"),
                            ("claim latency p99, %s held (ms)" % hs, "held_p99_held")):
            rows.append((label, m(meas, "litetq"), m(meas, "litetq-pg")))
        w("")
        w("Flow control (litetq): SQLite vs PostgreSQL, same run")
        _table(w, ("measurement", "SQLite", "PostgreSQL"), (42, 14, 14), rows)
        w("End to end: %s no-op jobs, `worker --concurrency 2` (not --burst), from its launch "
          "until all are complete;" % format(n, ","))
        w("with 2 processes concurrency=4 never binds: that row is the cost of the limit's "
          "bookkeeping.")
        w("Held back: one worker process runs gate(), the only slot of its concurrency=1; the "
          "other process is idle with %s gate() steps" % hs)
        w("queued ahead (or none).  'Quiet after': from the gate's start until the worker uses "
          "< 10% of a core (parking the held steps, once);")
        w("then its CPU (supervisor + 2 processes) over %gs, then %d jobs enqueued 20 ms apart "
          "behind the held ones." % (self.cfg["idle_s"], k))

    def report_async(self, w):
        m = self.med
        if not any(r["measurement"].startswith(("sleep_", "noop_steps", "await_"))
                   for r in self.results):
            return
        c = self.cfg
        a, s = m("sleep_async", "litetq"), m("sleep_sync", "litetq")
        rows = [("%s steps of sleep(0.1), 1 process (s)" % format(c["async_sleep_n"], ","),
                 a, s, _ratio(a, s))]
        a, s = m("noop_steps_async", "litetq"), m("noop_steps_sync", "litetq")
        rows.append(("no-op steps, 1 process (steps/s)", a, s, _ratio(a, s)))
        n = format(c["waiters_n"], ",")
        rows.append(("%s x await job: wake-up p50 (ms)" % n, m("await_p50", "litetq"), None, None))
        rows.append(("%s x await job: wake-up p99 (ms)" % n, m("await_p99", "litetq"), None, None))
        rows.append(("%s x await job: CPU while idle (%%)" % n, m("await_cpu", "litetq"),
                     None, None))
        w("")
        w("asyncio (litetq on SQLite): async tasks vs the same as sync tasks")
        _table(w, ("measurement", "async", "sync", "async/sync"), (42, 14, 14, 14), rows)
        w("Sleep rows: `worker --burst --concurrency 1` (default --async-concurrency), launch "
          "to exit; the sync row is one run.")
        w("No-op steps: first to last step, timed inside the tasks.  Wake-up: from the end of "
          "the job's function (it returns time.time()) to the waiter's wake.")

    def report_soak(self, w):
        r = self.get("soak", "litetq", "NORMAL")
        if not r:
            return
        w("")
        w("Retention soak (SQLite): %s no-op jobs, `worker --concurrency 2 --keep %s`" % (
            format(r["n"], ","), r["keep"]))
        rows = [("%.1f" % s["t"], s["done"], s["rows"], s["db_mb"], s["wal_mb"])
                for s in r["series"]]
        _table(w, ("seconds", "jobs done", "rows kept", "db (MB)", "WAL (MB)"),
               (10, 12, 12, 10, 10), rows, fmt=lambda x: (
                   format(x, ",") if isinstance(x, int) else "%.1f" % x))
        growth = _ratio(r.get("rows_last_job"), r.get("rows_two_thirds"))
        if growth is None:
            verdict = "?"
        elif (r.get("t_last_job") or 0) < 4 * r["keep_s"]:
            verdict = "run too short to judge (under 4 keep periods)"
        else:
            verdict = "levels off" if growth <= 1.1 else "DOES NOT level off"
        w("rows kept at 2/3 of the jobs %s, at the last job %s (x%s): %s" % (
            _fmt(r.get("rows_two_thirds")), _fmt(r.get("rows_last_job")), _fmt(growth), verdict))
        w("database at 2/3 of the jobs %s MB, at the end %s MB; largest WAL %s MB" % (
            _fmt(r.get("db_mb_two_thirds")), _fmt(r.get("db_mb_end")),
            _fmt(r.get("wal_mb_max"))))
        w("retention after the last job: %s rows deleted a second (the last line: one keep "
          "period + 2 s after the one before)" % _fmt(r.get("purge_rate")))


HUEY_TABLE = {"enqueue", "enqueue_many", "e2e_w1", "e2e_w2", "pickup_p50", "pickup_p99",
              "countdown"} | {"backlog_%d" % v for cfg in (QUICK, FULL)
                              for v in (cfg["backlog_small"], cfg["backlog_big"])}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _version(dist):
    try:
        import importlib.metadata
        return importlib.metadata.version(dist)
    except Exception:  # noqa: BLE001
        return "?"


def _table(w, header, widths, rows, fmt=None):
    """Column 0 and the text columns ('target', '') left-aligned, numbers right-aligned."""
    fmt = fmt or _fmt

    def line(cells):
        return "  ".join(c.ljust(wd) if i == 0 or header[i] in ("target", "") else c.rjust(wd)
                         for i, (c, wd) in enumerate(zip(cells, widths))).rstrip()
    w(line(header))
    w("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for row in rows:
        w(line([row[0]] + [x if isinstance(x, str) else fmt(x) for x in row[1:]]))


def _first_not_done(ids, hint, done):
    """Jobs run in FIFO order: the index of the first job not yet done, found by
    galloping forward from `hint` and then bisecting, so that the lookups stay
    near the head of the queue whatever the size of the backlog."""
    lo, step = hint, 64
    if lo >= len(ids) or not done(ids[lo]):
        return lo
    while lo + step < len(ids) and done(ids[lo + step]):
        lo += step
        step *= 2
    hi = min(len(ids), lo + step)   # ids[lo] done; first not-done index is in (lo, hi]
    lo += 1
    while lo < hi:
        mid = (lo + hi) // 2
        if done(ids[mid]):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _merge_mon(mons):
    out = {}
    for k in ("supervisor_peak_mb", "worker_peak_mb", "max_process_peak_mb", "wal_max_mb"):
        vs = [m.get(k) for m in mons if m.get(k) is not None]
        out[k] = max(vs) if vs else None
    return out


def _find_conns(obj, depth=3, seen=None):
    """sqlite3 connections reachable from obj's attributes (to read back pragmas)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return []
    seen.add(id(obj))
    if isinstance(obj, sqlite3.Connection):
        return [obj]
    if isinstance(obj, (list, tuple, set)):
        vals = list(obj)
    elif isinstance(obj, dict):
        vals = list(obj.values())
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        vals = list(vars(obj).values())
    else:
        return []
    found = []
    for v in vals:
        for c in _find_conns(v, depth - 1, seen):
            if c not in found:
                found.append(c)
    return found


def _sync_of(lib):
    return "server" if lib.endswith("-pg") else "NORMAL"


def _wait_lines(path, n, timeout):
    """The lines of `path` once it has n of them (complete, newline-ended)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                lines = [ln for ln in f.read().split("\n")[:-1] if ln]
        except FileNotFoundError:
            lines = []
        if len(lines) >= n:
            return lines
        if time.monotonic() > deadline:
            raise TimeoutError("%d of %d lines in %s" % (len(lines), n, path))
        time.sleep(0.01)


def _sleep_until(t):
    d = t - time.time()
    if d > 0:
        time.sleep(d)


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, (int, float)):
        if abs(x) >= 1000:
            return format(round(x), ",")
        if abs(x) >= 100:
            return "%.0f" % x
        if abs(x) >= 10:
            return "%.1f" % x
        return "%.2f" % x
    return str(x)


def _git_rev():
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "litetq.py"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return "commit %s%s" % (rev or "?", " + uncommitted changes to litetq.py" if dirty else "")
    except Exception:  # noqa: BLE001
        return "commit ?"


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


GROUPS = {
    "huey": ["enqueue", "many", "e2e", "pickup", "backlog", "countdown"],
    "pg": ["pg-enqueue", "pg-many", "pg-e2e", "pg-pickup", "pg-countdown"],
    "flow": ["flow-e2e", "flow-idle"],
    "async": ["async-sleep", "async-noop", "async-wait"],
    "soak": ["soak"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--runs", "--reps", dest="reps", type=int,
                    help="runs of each measurement, the median shown (default 3)")
    ap.add_argument("--dir", help="parent of the temp folders (default: system temp)")
    ap.add_argument("--only", help="comma list of rows or groups: %s" % "; ".join(
        "%s = %s" % (g, ",".join(rows)) for g, rows in GROUPS.items()))
    ap.add_argument("--no-huey", action="store_true")
    ap.add_argument("--no-litetq", action="store_true")
    ap.add_argument("--no-procrastinate", action="store_true")
    ap.add_argument("--no-postgres", action="store_true",
                    help="skip every PostgreSQL row (flow control runs on SQLite only)")
    ap.add_argument("--keep", action="store_true", help="keep databases and logs")
    ap.add_argument("--footprint-seconds", type=float,
                    help="cap on the extra footprint drain (default 90, quick 2)")
    args = ap.parse_args()
    every = [row for rows in GROUPS.values() for row in rows]
    only = None
    if args.only:
        only = set()
        for name in args.only.split(","):
            name = name.strip()
            if name in GROUPS:
                only.update(GROUPS[name])
            elif name in every:
                only.add(name)
            else:
                ap.error("--only: unknown row or group %r (rows: %s; groups: %s)" % (
                    name, ",".join(every), ",".join(GROUPS)))
    if args.no_postgres:
        every = [row for row in every if not row.startswith("pg-")]
    t0 = time.monotonic()
    # Byte-compile litetq as `pip install` does (huey, installed by pip, already is):
    # without a .pyc every process compiles the module, which adds ~6 MB to its peak
    # RSS on machines that set PYTHONDONTWRITEBYTECODE.
    py_compile.compile(os.path.join(REPO, "litetq.py"), doraise=True)
    b = Bench(args)
    b.notes.append("litetq.py byte-compiled first, as pip install does")
    steps = {"enqueue": b.m_enqueue, "many": b.m_enqueue_many, "e2e": b.m_e2e,
             "pickup": b.m_pickup, "backlog": b.m_backlog, "countdown": b.m_continuations,
             "pg-enqueue": b.m_pg_enqueue, "pg-many": b.m_pg_many, "pg-e2e": b.m_pg_e2e,
             "pg-pickup": b.m_pg_pickup, "pg-countdown": b.m_pg_countdown,
             "flow-e2e": b.m_flow_e2e, "flow-idle": b.m_flow_idle,
             "async-sleep": b.m_async_sleep, "async-noop": b.m_async_noop,
             "async-wait": b.m_async_wait, "soak": b.m_soak}
    try:
        b.durability()
        for name in every:
            if only and name not in only:
                continue
            log("== %s" % name)
            try:
                steps[name]()
            except Exception as e:  # noqa: BLE001
                import traceback
                traceback.print_exc()
                b.notes.append("%s failed: %r" % (name, e))
        b.report(time.monotonic() - t0)
    finally:
        b.stop_all()
        if b.pg is not None:
            b.pg.close()
        if not args.keep:
            shutil.rmtree(b.tmp, ignore_errors=True)
        else:
            log("kept %s" % b.tmp)


if __name__ == "__main__":
    main()
