"""``--compile`` side by side: a training step and an inference batch of RLRR and full fine-tuning on one
backbone, eager and through ``torch.compile`` (``rlrr.engine.compile.compiled``, the path the CLI takes),
in one run with the variants interleaved so the machine's drift hits each alike.  Compilation time (the
first calls) is reported apart from the steady-state step.  Prints one JSON line per variant and writes
``last_compile.json``.

    python benchmarks/compile.py [--model vit_small_patch16_224] [--img 112] [--batch 16] [--backends inductor,aot_eager]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import rlrr
from rlrr.engine.compile import compiled
from timing import best_interleaved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backends", default="inductor,aot_eager")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = rlrr.create_backbone(args.model, weights=None, num_classes=100, img_size=args.img)
    x = torch.randn(args.batch, 3, args.img, args.img)
    y = torch.randint(0, 100, (args.batch,))
    steps, infers, first = {}, {}, {}
    for method in ("rlrr", "full"):
        for backend in ("none", *args.backends.split(",")):
            m = rlrr.apply(copy.deepcopy(base), rlrr.make_config(method)).train()
            run = compiled(m, backend)
            opt = torch.optim.AdamW([p for _, p in rlrr.trainable_parameters(m)], 1e-4)
            name = f"{method} {backend if backend != 'none' else 'eager'}"

            def step(run=run, opt=opt) -> None:
                torch.nn.functional.cross_entropy(run(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def infer(run=run, m=m) -> None:
                m.eval()
                with torch.no_grad():
                    run(x)
                m.train()
            t = time.perf_counter()
            step()
            infer()
            first[name] = time.perf_counter() - t  # compiling both graphs (eager: one plain step)
            steps[name], infers[name] = step, infer
    step_s = best_interleaved(steps, args.reps, "cpu")
    infer_s = best_interleaved(infers, args.reps, "cpu")
    rows = []
    for name in steps:
        method = name.split()[0]
        row = {"variant": name, "model": args.model, "img": args.img, "batch": args.batch,
               "first_calls_s": round(first[name], 2), "step_s": round(step_s[name], 4),
               "step_vs_eager": round(step_s[name] / step_s[f"{method} eager"], 3), "infer_s": round(infer_s[name], 4),
               "infer_vs_eager": round(infer_s[name] / infer_s[f"{method} eager"], 3)}
        rows.append(row)
        print(json.dumps(row))
    Path(__file__).with_name("last_compile.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
