#!/usr/bin/env python3
"""A/B of builds of this project: `bert-bench infer` of each build, alternating, round after round.

    ab_infer.py --model DIR --shapes 32x128,8x512 --rounds 4 old=path/to/bert-bench new=path/to/other

Each round runs every shape on every build in turn (one process each: `--warmup` untimed passes,
then `--runs` timed ones), so a slow spell of a shared machine falls on all of them alike. Per
shape and build it prints the median wall time of every timed pass of every round and the median
CPU time (user + system) of the processes, each with the first build's over it (above 1: this
build is faster). How the figures
in README.md's step-by-step notes were measured; the side-by-side tables with the peers come from
compare_inference.py.
"""

import argparse
import json
import os
import statistics
import subprocess


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--shapes", default="32x128,8x512", help="BATCHxSEQ, comma-separated")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("builds", nargs="+", help="NAME=path/to/bert-bench, the first one the reference")
    args = p.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    builds = dict(b.split("=", 1) for b in args.builds)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    wall = {(n, s): [] for n in builds for s in shapes}
    cpu = {(n, s): [] for n in builds for s in shapes}
    for _ in range(args.rounds):
        for shape in shapes:
            for name, path in builds.items():
                cmd = [path, "infer", "--model", args.model, "--batch", str(shape[0]), "--seq", str(shape[1]),
                       "--warmup", str(args.warmup), "--runs", str(args.runs)]
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
                out = proc.stdout.read()
                _, status, usage = os.wait4(proc.pid, 0)
                if status != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({status})")
                wall[(name, shape)] += json.loads(out.strip().splitlines()[-1])["runs_s"]
                cpu[(name, shape)].append(usage.ru_utime + usage.ru_stime)
    for shape in shapes:
        ref_wall = ref_cpu = None
        for name in builds:
            w = statistics.median(wall[(name, shape)])
            c = statistics.median(cpu[(name, shape)])
            ref_wall, ref_cpu = ref_wall or w, ref_cpu or c
            print(f"{shape[0]}x{shape[1]} {name:>12}: wall median {w * 1e3:7.1f} ms (x{ref_wall / w:.3f}), "
                  f"CPU per process median {c:6.2f} s (x{ref_cpu / c:.3f})")


if __name__ == "__main__":
    main()
