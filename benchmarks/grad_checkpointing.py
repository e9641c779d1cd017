"""``--grad-checkpointing`` side by side: activations kept for backward and training-step time, with and
without, for RLRR, LoRA r=8 and full fine-tuning on one backbone, in one run (the six variants' steps
interleaved so the machine's drift hits each alike).

Activations kept for backward are counted exactly (``rlrr.engine.memory.saved_activation_bytes``: the
storages autograd saves, without parameters and input); peak RSS is not, as on a CPU it also holds the
allocator's free pages.  Prints one JSON line per variant and writes ``last_grad_checkpointing.json``.

    python benchmarks/grad_checkpointing.py [--model vit_base_patch16_224] [--img 112] [--batch 16] [--reps 3]
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import rlrr
from rlrr.engine.checkpointing import enable_grad_checkpointing
from rlrr.engine.memory import saved_activation_bytes
from timing import best_interleaved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = rlrr.create_backbone(args.model, weights=None, num_classes=100, img_size=args.img)
    x = torch.randn(args.batch, 3, args.img, args.img)
    y = torch.randint(0, 100, (args.batch,))
    models, steps = {}, {}
    for method in ("rlrr", "lora", "full"):
        for ckpt in (False, True):
            m = rlrr.apply(copy.deepcopy(base), rlrr.make_config(method)).train()
            if ckpt:
                enable_grad_checkpointing(m)
            name = f"{method}{' +ckpt' if ckpt else ''}"
            opt = torch.optim.AdamW([p for _, p in rlrr.trainable_parameters(m)], 1e-4)

            def step(m=m, opt=opt) -> None:
                torch.nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            models[name], steps[name] = m, step
    times = best_interleaved(steps, args.reps, "cpu", rounds=2, warmup=1)
    rows = []
    for name, m in models.items():
        saved = saved_activation_bytes(lambda m=m: m(x), [*m.parameters(), *m.buffers(), x])
        rows.append({"variant": name, "step_ms": round(1000 * times[name], 1), "saved_mb": round(saved / 2**20, 1)})
    for method in ("rlrr", "lora", "full"):
        plain, ckpt = (next(r for r in rows if r["variant"] == v) for v in (method, f"{method} +ckpt"))
        ckpt.update(saved_ratio=round(ckpt["saved_mb"] / plain["saved_mb"], 3),
                    step_ratio=round(ckpt["step_ms"] / plain["step_ms"], 3))
    for r in rows:
        print(json.dumps(r))
    out = {"model": args.model, "img": args.img, "batch": args.batch, "rows": rows}
    Path(__file__).with_name("last_grad_checkpointing.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
