"""``python -m sliderquant.bench threads``: speed on a quiet and on a loaded machine, per OpenMP setting.

OpenMP threads that wait for work spin on a CPU before they sleep (libgomp's default; torch and our
kernels share one runtime).  On a machine whose cores are busy with other jobs, a spinning waiter
takes CPU time from the threads that have work, and a parallel region cannot end until every one of
its threads, possibly descheduled, has arrived: then a loop of small parallel calls can run many
times slower.  ``OMP_WAIT_POLICY=PASSIVE`` makes waiters sleep at once; ``GOMP_SPINCOUNT=10000``
(sliderquant's default, see ``openmp_env``) spins briefly first.  The setting is read
once, when the OpenMP runtime starts (when torch is imported), so every setting is measured in a
fresh interpreter.

Each configuration (wait policy x threads of the C kernels) runs two loops in a child process:
``kernel``, repeated ``fake_quant_weight`` forward+backward calls on a SmolLM2-sized weight
(1536 x 576, W3 g64, LWC + LoRA: the calibration's hot call), and ``matmul``, repeated
(512 x 576) @ (576 x 1536) products (torch's own threads).  ``quiet`` adds no load; ``loaded`` starts
``--load`` busy-loop processes (each ends by itself after ``--load-seconds`` and is terminated when
its measurement is done).  Configurations and load states are interleaved over ``--reps`` rounds;
the table gives the median and the range, and the load averages (1, 5, 15 min) seen at each round.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

# (name, environment of the child, threads the C kernels may use; None = the default rule of ops)
CONFIGS = (
    ("omp-default", {}, None),
    ("passive", {"OMP_WAIT_POLICY": "PASSIVE"}, None),
    ("spin10k (default)", {"GOMP_SPINCOUNT": "10000"}, None),
    ("spin10k k1", {"GOMP_SPINCOUNT": "10000"}, 1),
)

_CHILD = r"""
import json, sys, time
import torch
from sliderquant import ops
calls, threads, kthreads = {calls}, {threads}, {kthreads}
torch.set_num_threads(threads)
if kthreads is not None:
    ops.KERNEL_THREADS = kthreads
g = torch.Generator().manual_seed(0)
w = torch.randn(1536, 576, generator=g) * 0.05
u = torch.full((1536, 9), 4.0, requires_grad=True)
a = (torch.randn(4, 576, generator=g) * 0.01).requires_grad_()
b = torch.zeros(1536, 4, requires_grad=True)
x = torch.randn(512, 576, generator=g)
m = torch.randn(576, 1536, generator=g)

def kernel():
    ops.fake_quant_weight(w, 3, 64, lwc_upper=u, lwc_lower=u, lora_a=a, lora_b=b).sum().backward()

def matmul():
    torch.mm(x, m)

out = {{}}
for name, fn in (("kernel", kernel), ("matmul", matmul)):
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    out[name] = time.perf_counter() - t0
print(json.dumps(out))
"""


def _busy(seconds: float) -> subprocess.Popen:
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def _child(env_extra: dict, kthreads, calls: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    code = _CHILD.format(calls=calls, threads=threads, kthreads=kthreads)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"measurement child failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_threads(calls: int = 200, threads: int = 2, load: int = 4, reps: int = 3, load_seconds: float = 120.0,
                  configs=CONFIGS):
    """Rows: one per (config, load state, loop), with the times of every round and the load averages."""
    times = {}
    loadavg = {"quiet": [], "loaded": []}
    for _ in range(reps):
        for state in ("quiet", "loaded"):
            for name, env_extra, kthreads in configs:
                procs = [_busy(load_seconds) for _ in range(load)] if state == "loaded" else []
                try:
                    if procs:
                        time.sleep(0.5)                  # let the busy loops start
                    loadavg[state].append(os.getloadavg())
                    result = _child(env_extra, kthreads, calls, threads)
                finally:
                    for p in procs:
                        p.terminate()
                    for p in procs:
                        p.wait()
                for loop, seconds in result.items():
                    times.setdefault((name, state, loop), []).append(seconds)
    rows = []
    for (name, state, loop), ts in times.items():
        rows.append(dict(config=name, state=state, loop=loop, calls=calls, threads=threads,
                         load_processes=load if state == "loaded" else 0, median_s=statistics.median(ts),
                         min_s=min(ts), max_s=max(ts), times=ts, loadavg=loadavg[state]))
    return rows


def print_threads(rows) -> None:
    head = f"{'loop':<7} {'config':<15} {'quiet s (min-max)':>22} {'loaded s (min-max)':>22} {'loaded/quiet':>12}"
    print(head)
    print("-" * len(head))
    by = {(r["loop"], r["config"], r["state"]): r for r in rows}
    for loop in ("kernel", "matmul"):
        for name in dict.fromkeys(r["config"] for r in rows):
            q, l = by[(loop, name, "quiet")], by[(loop, name, "loaded")]
            print(f"{loop:<7} {name:<15} {q['median_s']:8.3f} ({q['min_s']:.3f}-{q['max_s']:.3f}) "
                  f"{l['median_s']:8.3f} ({l['min_s']:.3f}-{l['max_s']:.3f}) {l['median_s'] / q['median_s']:11.1f}x")
    r = rows[0]
    fmt = lambda avgs: "; ".join("/".join(f"{v:.1f}" for v in a) for a in avgs)   # noqa: E731
    print(f"\nseconds for {r['calls']} calls, median of {len(r['times'])} interleaved rounds; torch threads "
          f"{r['threads']}; loaded = {max(x['load_processes'] for x in rows)} extra busy-loop processes; "
          f"k1 = C kernels on one thread.\nload averages (1/5/15 min) at each quiet round: "
          f"{fmt(by[('kernel', r['config'], 'quiet')]['loadavg'])}\n"
          f"load averages at each loaded round: {fmt(by[('kernel', r['config'], 'loaded')]['loadavg'])}")
