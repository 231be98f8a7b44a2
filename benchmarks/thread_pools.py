"""Why `serve` loads its model on a passing thread: the C++ decode step's time by which thread
runs it, in one process, alternated.

    python benchmarks/thread_pools.py --model FOLDER [--rounds 3] [--steps 20]

FOLDER: an int8 checkpoint (`smallcoder quantize`). The model is loaded on the main thread (its
torch work leaves that thread an OpenMP pool), then one-token steps at context ~100 run on the main
thread and on a second thread, alternated: with two pools there are more OpenMP threads than 2
cores and libgomp throttles its spinning, so every barrier of a step sleeps. Then, in a second
process, the load runs on a thread that exits and the steps on another (what `serve` does).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

import torch

from smallcoder import KVCache, load
from smallcoder.kernels import build


def steps(kernel, config, n: int) -> float:
    cache = KVCache(config, 1, 1024, torch.float32)
    x = torch.randn(1, config.hidden_size)
    t0 = time.perf_counter()
    for i in range(n):
        kernel(x, cache, torch.tensor([100 + i]))
    return (time.perf_counter() - t0) / n * 1000


def on_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("v", fn()))
    t.start()
    t.join()
    return box["v"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--passing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.passing:
        model = on_thread(lambda: load(args.model, dtype="int8")[0])
        k = build(model)
        ms = [on_thread(lambda: steps(k, model.config, args.steps)) for _ in range(args.rounds)]
        print(f"load on a thread that exited, steps on another: {statistics.median(ms):.1f} ms/step")
        return
    model = load(args.model, dtype="int8")[0]
    k = build(model)
    main_ms, other_ms = [], []
    for _ in range(args.rounds):
        main_ms.append(steps(k, model.config, args.steps))
        other_ms.append(on_thread(lambda: steps(k, model.config, args.steps)))
    print(f"load on the main thread, steps on the main thread: {statistics.median(main_ms):.1f} ms/step")
    print(f"load on the main thread, steps on a second thread: {statistics.median(other_ms):.1f} ms/step")
    subprocess.run([sys.executable, __file__, "--model", args.model, "--rounds", str(args.rounds),
                    "--steps", str(args.steps), "--passing"], check=True)


if __name__ == "__main__":
    main()
