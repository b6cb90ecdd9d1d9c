"""Where a training step's time goes: torch profiler self-time by kind of work, and kernel time / page faults.

For the Vaswani model (the plain ``model(**batch)`` path that transformers' Trainer and hand-written loops call)
and MarianMTModel of the same shape and weights, fp32 and bf16 autocast, on ``model_bench``'s batch:

* the share of the step's CPU time in each kind of operator (matrix products, casts and copies, layer norms,
  soft-max and loss, dropout, the optimizer, the rest), from the profiler's self time per operator;
* user and kernel (system) CPU seconds per step and minor page faults per step, from ``getrusage`` over
  unprofiled steps: kernel time here is mostly the page faults of freshly mapped buffers, which
  :func:`vaswani.perf.tune_allocator` removes (``--allocator default`` leaves glibc's defaults).

    python benchmarks/step_profile.py [--shapes small,base] [--precisions fp32,bf16] [--allocator tuned|default]
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import resource
import sys

import torch
from model_bench import PRECISIONS, build_models, make_optimizer, make_train_step, random_batch
from torch.profiler import ProfilerActivity, profile

from vaswani.perf import cpu_description, flush_denormals, tune_allocator

#: Operator name fragments → the kind of work; the first match wins, the rest is "other".
KINDS = (
    ("matrix products", ("mm", "matmul", "linear", "attention", "baddbmm", "mkldnn", "onednn")),
    ("casts and copies", ("copy_", "_to_copy", "clone", "contiguous", "cat", "index", "masked_scatter")),
    ("layer norm", ("layer_norm",)),
    ("soft-max and loss", ("softmax", "nll", "cross_entropy", "logsumexp", "exp", "log")),
    ("dropout", ("dropout", "bernoulli", "rand", "lt", "uniform")),
    ("optimizer", ("adam",)),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(part in low for part in parts)), "other")


def profile_step(step, steps: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Share of self CPU time per kind over ``steps`` profiled steps, and the top operators (name, share)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(t for _, t in ops)
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, t in ops:
        kinds[kind_of(name)] += t / total
    top = sorted(ops, key=lambda op: -op[1])[:8]
    return dict(kinds), [(name, t / total) for name, t in top]


def rusage_per_step(step, steps: int) -> tuple[float, float, float]:
    """(user s, system s, minor page faults) per step, over ``steps`` unprofiled steps."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (
        (after.ru_utime - before.ru_utime) / steps,
        (after.ru_stime - before.ru_stime) / steps,
        (after.ru_minflt - before.ru_minflt) / steps,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="small,base", help="comma-separated: small, base")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--allocator", choices=["tuned", "default"], default="tuned")
    parser.add_argument("--train-batch", type=int, default=96, help="sentences per training batch")
    parser.add_argument("--steps", type=int, default=4, help="steps profiled, and steps timed by getrusage")
    args = parser.parse_args(argv)
    allocator = "tune_allocator()" if args.allocator == "tuned" and tune_allocator() else "glibc defaults"
    flush_denormals()
    print(f"Date {datetime.date.today()}, {cpu_description()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; allocator: {allocator}; denormals flushed; batch {args.train_batch}.\n")
    kinds = [kind for kind, _ in KINDS] + ["other"]
    lines = [
        "| shape | precision | model | " + " | ".join(kinds) + " | user s / step | kernel s / step "
        "| kernel share | minor faults / step |",
        "|---|---|---|" + "---:|" * (len(kinds) + 4),
    ]
    tops = []
    for shape in args.shapes.split(","):
        vaswani, marian = build_models(shape)
        batch = random_batch(vaswani.config, args.train_batch, 25, seed=2)
        for precision in args.precisions.split(","):
            for name, model in (("vaswani", vaswani), ("marian", marian)):
                trainee = copy.deepcopy(model).train()
                step = make_train_step(trainee, make_optimizer(trainee), batch, PRECISIONS[precision])
                step(), step()  # Adam state, warm-up
                shares, top = profile_step(step, args.steps)
                user, system, faults = rusage_per_step(step, args.steps)
                lines.append(
                    f"| {shape} | {precision} | {name} | "
                    + " | ".join(f"{shares.get(kind, 0.0):.0%}" for kind in kinds)
                    + f" | {user:.2f} | {system:.2f} | {system / (user + system):.0%} | {faults:,.0f} |"
                )
                tops.append(f"{shape} {precision} {name}: " + ", ".join(f"{op} {share:.0%}" for op, share in top))
                print(lines[-1], file=sys.stderr, flush=True)
                del trainee, step
    print("\n".join(lines))
    print("\nTop operators by self CPU time:\n")
    print("\n".join(f"- {line}" for line in tops))


if __name__ == "__main__":
    main()
