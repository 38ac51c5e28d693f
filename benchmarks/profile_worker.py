#!/usr/bin/env python3
"""Profile the litetq worker draining a queue; print where its time goes.

    pip install py-spy
    python benchmarks/profile_worker.py [--jobs 20000] [--not-due 0]
                                        [--seconds S] [--concurrency 2]

The script queues --jobs due no-op jobs, plus --not-due jobs delayed by a
day (they sit in the table but do not run). It then runs `python -m litetq
worker DB` under `py-spy record --subprocesses`. With --burst that lasts
until the queue is drained; with --seconds S it records for S seconds, e.g.
S=10 with --jobs 1000000 profiles claims against a big backlog. The samples
of all processes (supervisor and workers) are summed by function: self time
(the leaf) and inclusive time. Without py-spy, it falls back to cProfile, which
runs one worker in-process through `Queue.run_until_idle()`.
"""

import argparse
import collections
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TASKS = "import litetq\n\n@litetq.task\ndef noop():\n    pass\n"


def summarize(raw, top):
    self_c, incl, total = collections.Counter(), collections.Counter(), 0
    with open(raw) as f:
        for line in f:
            line = line.rstrip()
            if not line or " " not in line:
                continue
            stack, n = line.rsplit(" ", 1)
            n = int(n)
            frames = [fr for fr in stack.split(";") if not fr.startswith("process ")]
            if not frames:
                continue
            total += n
            # group by function (drop the line number) to survive code changes
            funcs = [fr.rsplit(":", 1)[0] + ")" if fr.endswith(")") else fr for fr in frames]
            self_c[funcs[-1]] += n
            for fn in set(funcs):
                incl[fn] += n
    print("samples: %d" % total)
    print("\nself time (leaf function):")
    for fn, c in self_c.most_common(top):
        print("  %5.1f%%  %s" % (100.0 * c / total, fn))
    print("\ninclusive time, litetq / sqlite3 / logging / json:")
    shown = 0
    for fn, c in incl.most_common():
        if any(k in fn for k in ("litetq", "sqlite", "logging/", "json/")):
            print("  %5.1f%%  %s" % (100.0 * c / total, fn))
            shown += 1
            if shown >= top:
                break


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--not-due", type=int, default=0, help="extra queued jobs due tomorrow")
    ap.add_argument("--seconds", type=float, help="record this long (default: burst to empty)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="litetq-prof-")
    try:
        with open(os.path.join(tmp, "proftasks.py"), "w") as f:
            f.write(TASKS)
        sys.path[:0] = [tmp, REPO]
        import litetq
        import proftasks
        db = os.path.join(tmp, "prof.sqlite")
        q = litetq.Queue(db)
        for base in range(0, args.not_due, 10000):
            q.enqueue_many([proftasks.noop() for _ in range(min(10000, args.not_due - base))],
                           delay=86400)
        for base in range(0, args.jobs, 10000):
            q.enqueue_many([proftasks.noop() for _ in range(min(10000, args.jobs - base))])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, REPO]))
        worker = [sys.executable, "-m", "litetq", "worker", db,
                  "--concurrency", str(args.concurrency), "--import", "proftasks"]
        if not args.seconds:
            worker.append("--burst")
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if os.path.exists(spy):
            raw = os.path.join(tmp, "prof.raw")
            t = time.perf_counter()
            dur = ["-d", str(int(math.ceil(args.seconds)))] if args.seconds else []
            spy_p = subprocess.Popen([spy, "record", "--subprocesses", "--nonblocking", "-r",
                                      str(args.rate), "-f", "raw", "-o", raw] + dur + ["--"]
                                     + worker, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
            spy_p.wait()
            dt = time.perf_counter() - t
            # py-spy -d may leave the (non-burst) worker running: it is in py-spy's
            # own session, so stop that process group
            try:
                os.killpg(spy_p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            done = q.stats().get("default", {}).get("complete", 0)
            print("%d jobs complete in %.2f s under py-spy (%.0f jobs/s incl. start-up); %s"
                  % (done, dt, done / dt, q.stats()))
            summarize(raw, args.top)
        else:
            import cProfile
            import pstats
            print("py-spy not found: cProfile of Queue.run_until_idle() in this process")
            prof = cProfile.Profile()
            t = time.perf_counter()
            prof.runcall(q.run_until_idle)
            dt = time.perf_counter() - t
            print("ran %d jobs in %.2f s" % (args.jobs, dt))
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        q.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
