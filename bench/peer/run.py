"""
The PyTorch peer of `deno task bench`: runs the workloads of a plan written by bench/peer.ts and prints one JSON
object on stdout (progress goes to stderr).

  /usr/bin/python3 bench/peer/run.py PLAN.json

Op and model groups run in a fresh process per thread count (thread pools cannot be resized reliably once a BLAS has
started them); each row keeps the faster run (the smaller one for memory) and records its thread count. Image groups
run once: Pillow decodes on one thread, and the loader row uses worker processes instead.
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

THREADED = ("ops", "embed", "train")
SINGLE = ("decode", "loader")


def group_function(group):
    if group in SINGLE:
        import images

        return {"decode": images.decode_rows, "loader": images.loader_rows}[group]
    import workloads

    return {"ops": workloads.ops_rows, "embed": workloads.embed_rows, "train": workloads.train_rows}[group]


def worker(group, plan, threads):
    import torch

    torch.set_num_threads(threads)
    rows, checks = group_function(group)(plan[group])
    print(json.dumps({"rows": rows, "checks": checks}))


def blas_description():
    """The BLAS library torch has loaded, with OpenBLAS's own configuration string when it is OpenBLAS."""
    import torch

    torch.ones(64, 64) @ torch.ones(64, 64)
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "blas" in line.lower() and "/" in line})
    if not paths:
        return "none loaded (torch's own kernels)"
    configs = set()
    for path in paths:
        try:
            config = ctypes.CDLL(path).openblas_get_config
            config.restype = ctypes.c_char_p
            configs.add(config().decode())
        except (OSError, AttributeError):
            pass
    return ", ".join(paths) + (f" ({'; '.join(sorted(configs))})" if configs else "")


def run_worker(group, plan_path, threads):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", group, "--threads", str(threads), plan_path],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    print(f"peer {group} with {threads} thread(s): {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if proc.returncode != 0:
        return None, f"peer {group} ({threads} threads) exited with {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def better(a, b):
    """The better of two measurements of one row: less memory, or more throughput."""
    if a is None or a["value"] is None:
        return b
    if b is None or b["value"] is None:
        return a
    lower_is_better = a["unit"] == "MiB"
    return b if (b["value"] < a["value"]) == lower_is_better else a


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("plan")
    parser.add_argument("--worker")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with open(args.plan) as f:
        plan = json.load(f)
    if args.worker:
        worker(args.worker, plan, args.threads)
        return
    import torch

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "blas": blas_description(),
        "threadsTried": plan["threads"],
        "rows": {},
        "checks": {},
        "errors": [],
    }
    for group in THREADED + SINGLE:
        if group not in plan:
            continue
        by_threads = {}
        for threads in plan["threads"] if group in THREADED else [1]:
            result, error = run_worker(group, args.plan, threads)
            if error:
                out["errors"].append(error)
                continue
            by_threads[threads] = result["rows"]
            for key, value in result["checks"].items():
                out["checks"].setdefault(key, value)
        names = {name for rows in by_threads.values() for name in rows}
        for name in sorted(names):
            best = None
            for threads, rows in by_threads.items():
                if name in rows:
                    candidate = dict(rows[name], threads=threads)
                    best = better(best, candidate)
            best["byThreads"] = {t: rows[name]["value"] for t, rows in by_threads.items() if name in rows}
            out["rows"][name] = best
    print(json.dumps(out))


if __name__ == "__main__":
    main()
