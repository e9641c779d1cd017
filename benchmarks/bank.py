"""Mixed-task inference: the adapter bank against what a user would do without it, side by side.

ViT-B/16 (random weights, 112 px), batch 64 split evenly over K = 1, 4, 16, 64 RLRR tasks, each with
its own 10-class head.  Per batch, in one run and interleaved:

* floor        — the frozen backbone alone (one forward, one head);
* bank         — ``AdapterBank`` in its ``auto`` mode (keeping the last one-task W'), and forced
                 ``shared`` / ``grouped`` (forming every W' each call) for reference;
* swap         — one RLRR model whose tensors are swapped per task, each task's sub-batch run in turn
                 (eval mode forms W' per swap: a merge per task);
* resident     — K merged copies kept in memory, each running its sub-batch (only where K copies fit);
* bank compiled — with ``--compile BACKEND``: ``AdapterBank(compile=...)``, the shared form as one graph
                 (warmed up on the batch first: the compile time is printed, not timed);
* peft LoRA    — peft's mixed-batch LoRA (r=8 on q, v; ``adapter_names=``), for context: its per-sample
                 update is a rank-8 product, cheaper by construction than RLRR's full-rank rescale.

Also the bank's memory per added task (the bytes of its stacked tensors and head) against the task's
adapter file size.

    python benchmarks/bank.py [--ks 1,4,16,64] [--batch 64] [--img 112] [--reps 3] [--compile inductor]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import rlrr
from rlrr.adapter import read_adapter
from timing import best_interleaved

MODEL = "vit_base_patch16_224"


def make_adapters(base: torch.nn.Module, k: int, folder: Path) -> list[Path]:
    """K RLRR adapters of ``base`` with distinct random vectors (as if trained) and their own heads."""
    model = rlrr.apply(copy.deepcopy(base), rlrr.RLRRConfig())
    paths = []
    for t in range(k):
        torch.manual_seed(100 + t)
        with torch.no_grad():
            for _, p in rlrr.trainable_parameters(model):
                p.copy_(torch.randn_like(p) * 0.1)
        paths.append(rlrr.save_adapter(model, folder / f"task{t}.safetensors"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--resident-max", type=int, default=16, help="largest K whose merged copies are kept")
    ap.add_argument("--compile", default=None, metavar="BACKEND", help="also time the compiled bank")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ks = [int(k) for k in args.ks.split(",")]
    torch.manual_seed(0)
    base = rlrr.create_backbone(MODEL, weights=None, num_classes=10, img_size=args.img).eval()
    x = torch.randn(args.batch, 3, args.img, args.img)
    folder = Path(tempfile.mkdtemp())
    paths = make_adapters(base, max(ks), folder)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {MODEL} @ {args.img}px, batch {args.batch}, "
          f"best of 2 interleaved medians of {args.reps}", flush=True)

    # forced forms without the kept W' (each call forms what it needs); auto as served
    banks = {mode: rlrr.AdapterBank(copy.deepcopy(base), mode=mode, keep_last=mode == "auto")
             for mode in ("auto", "shared", "grouped")}
    if args.compile:
        banks["compiled"] = rlrr.AdapterBank(copy.deepcopy(base), compile=args.compile)
    memory = measure_memory(banks["auto"], paths[0], 2)
    swap = rlrr.apply(copy.deepcopy(base), rlrr.RLRRConfig()).eval()
    states = [read_adapter(p)[0] for p in paths]
    rows = []
    for k in ks:
        names = [f"task{t}" for t in range(k)]
        for bank in banks.values():
            for n, p in zip(names, paths):
                if n not in bank.tasks:
                    bank.add(n, p)
        tasks = [names[i * k // args.batch] for i in range(args.batch)]  # contiguous, even split
        if args.compile:
            start = time.perf_counter()
            banks["compiled"](x, tasks)
            print(f"K={k}: compiled bank's first batch {time.perf_counter() - start:.1f} s", flush=True)
        parts = [[i for i, t in enumerate(tasks) if t == n] for n in names]

        def swapped() -> None:
            own = dict(swap.named_parameters())
            for state, idx in zip(states[:k], parts):
                for name, t in state.items():
                    own[name].copy_(t)
                swap(x[idx])

        fns = {"floor": lambda: base(x), **{f"bank {m}": (lambda b=b: b(x, tasks)) for m, b in banks.items()},
               "swap": swapped}
        if k <= args.resident_max:
            resident = [rlrr.merge(rlrr.load_adapter(copy.deepcopy(swap), p)) for p in paths[:k]]
            fns["resident"] = lambda: [m(x[idx]) for m, idx in zip(resident, parts)]
        peft = peft_lora(base, k)
        if peft is not None:
            fns["peft LoRA"] = lambda: peft(x, adapter_names=tasks)  # noqa: F821 - bound above, deleted below
        t = best_interleaved(fns, args.reps, "cpu")
        row = {"K": k, **{name: round(1000 * s, 1) for name, s in t.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del fns, peft
        if k <= args.resident_max:
            del resident
    print_table(rows, memory)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "memory": memory}, indent=1))


def peft_lora(base: torch.nn.Module, k: int):
    """peft's LoRA (r=8 on q, v of timm's fused qkv via its layer names) with K adapters, or None without peft."""
    try:
        import peft
    except ImportError:
        return None
    model = copy.deepcopy(base)
    cfg = dict(r=8, lora_alpha=8, target_modules=["qkv"])
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**cfg), adapter_name="task0")
    for t in range(1, k):
        wrapped.add_adapter(f"task{t}", peft.LoraConfig(**cfg))
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, 0, 0.02)
    return wrapped.eval()


def measure_memory(bank: rlrr.AdapterBank, path: Path, n: int) -> dict:
    """Bytes the bank holds per added task (stacked site tensors and the head) against the adapter file."""
    def held() -> int:
        stacks = sum(t.numel() * t.element_size() for s in bank.sites().values() for t in s.stack.values())
        heads = sum(p.numel() * p.element_size() for task in bank.tasks.values() for p in task.head.parameters())
        return stacks + heads
    start = held()
    for i in range(n):
        bank.add(f"mem{i}", path)
    per_task = (held() - start) / n
    for i in range(n):
        bank.remove(f"mem{i}")
    return {"per_task_bytes": int(per_task), "adapter_file_bytes": path.stat().st_size,
            "ratio": round(per_task / path.stat().st_size, 3)}


def print_table(rows: list[dict], memory: dict) -> None:
    cols = [c for c in rows[0] if c != "K"]
    print("\n| K tasks | " + " | ".join(f"{c} ms" for c in cols) + " | bank/floor | bank/swap |")
    print("|---" * (len(cols) + 3) + "|")
    for r in rows:
        cells = " | ".join(f"{r[c]:.1f}" if c in r else "—" for c in cols)
        print(f"| {r['K']} | {cells} | {r['bank auto'] / r['floor']:.2f} | {r['bank auto'] / r['swap']:.2f} |")
    print(f"\nbank memory per added task: {memory['per_task_bytes']:,} B; adapter file {memory['adapter_file_bytes']:,} B "
          f"(ratio {memory['ratio']})")


if __name__ == "__main__":
    sys.exit(main())
