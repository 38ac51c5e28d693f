"""Time each JSON API call the web page makes on a database of 1,000,000 jobs.

    python benchmarks/web_api.py [DB] [--jobs N]

Builds DB (default /tmp/litetq-web-1m.sqlite; or a PostgreSQL URL) once with
enqueue_many, then gives the jobs realistic statuses in bulk (mostly complete, some failed, a few queued),
serves it with make_web_server and prints the median and worst time of each
endpoint over several calls.

The bulk UPDATE that finishes the jobs bypasses litetq, so the step counters (which
the counts of finished jobs come from) stay empty: /api/queues and /api/stats then time
only the index counts of unfinished jobs. The counters' table holds a row per minute,
queue, task and outcome for the last two hours and one total, whatever the job count,
so reading it adds little.
"""
import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import litetq  # noqa: E402

QUEUES = ["default", "emails", "reports", "billing"]
TASKS = ["app.send_email", "app.render", "app.charge", "app.resize", "app.sync"]


def build(db, count):
    q = litetq.Queue(db)
    rng = random.Random(1)
    batch = 20_000
    for start in range(0, count, batch):
        calls = [litetq.Task(rng.choice(TASKS), [start + i, f"user{rng.randrange(10**6)}"], {})
                 for i in range(min(batch, count - start))]
        q.enqueue_many(calls, queue=QUEUES[(start // batch) % len(QUEUES)])
    # Statuses as a long-running system has them: nearly all finished.
    q.storage.change("update litetq_jobs set status = 'complete', finished = created + 1, "
                     "result = '1' where id % 100 not in (1, 2, 3)")
    q.storage.change("update litetq_jobs set status = 'failed', finished = created + 1, "
                     "error = 'ValueError: boom ' || id, traceback = 'Traceback: ...' "
                     "where id % 100 = 1")
    q.storage.change("update litetq_jobs set status = 'cancelled', finished = created + 1 "
                     "where id % 1000 = 2")
    q.storage.change("vacuum" if "://" not in db else "vacuum analyze litetq_jobs")
    q.close()


def timed(base, path, method="GET"):
    request = urllib.request.Request(base + path, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as resp:
        body = json.loads(resp.read())
    return time.perf_counter() - began, body


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("db", nargs="?", default="/tmp/litetq-web-1m.sqlite",
                        help="a SQLite path or a PostgreSQL URL")
    parser.add_argument("--jobs", type=int, default=1_000_000)
    args = parser.parse_args()
    if not (os.path.exists(args.db) if "://" not in args.db else litetq.Queue(args.db).stats()):
        began = time.perf_counter()
        build(args.db, args.jobs)
        print(f"built {args.jobs} jobs in {time.perf_counter() - began:.0f} s")
    q = litetq.Queue(args.db)  # opening upgrades the schema (adds indexes) once
    q.schedule("nightly", "0 3 * * *", litetq.Task("app.sync", [], {}))
    server = litetq.make_web_server(q, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    _, first = timed(base, "/api/jobs?limit=100")
    middle = first["jobs"][0]["id"] // 2
    paths = [
        "/api/queues", "/api/stats", "/api/schedules",
        "/api/jobs", f"/api/jobs?before={middle}",
        "/api/jobs?status=failed", "/api/jobs?status=queued",
        "/api/jobs?status=complete", "/api/jobs?queue=emails",
        "/api/jobs?queue=emails&status=failed", "/api/jobs?task=app.charge",
        "/api/jobs?task=app.charge&status=failed&queue=billing",
        f"/api/jobs?queue=reports&before={middle}",
        "/api/jobs?q=user123", "/api/jobs?q=boom", "/api/jobs?q=nothing-matches-this",
        "/api/jobs?q=nothing-matches-this&status=failed&queue=emails",
        "/api/jobs?q=nothing-matches-this&queue=emails",
        "/api/jobs?q=nothing-matches-this&task=app.charge",
        f"/api/jobs?q=nothing-matches-this&before={middle}",
        f"/api/jobs?q={middle}", f"/api/jobs/{middle}",
    ]
    print(f"{'endpoint':58} {'median ms':>10} {'max ms':>8}")
    for path in paths:
        times = [timed(base, path)[0] for _ in range(7)]
        print(f"{path:58} {1000 * statistics.median(times):10.1f} {1000 * max(times):8.1f}")
    server.shutdown()
    q.close()


if __name__ == "__main__":
    main()
