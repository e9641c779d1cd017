"""Training-step time and peak memory of RLRR vs full fine-tuning vs LoRA r=8 vs a frozen backbone;
eval throughput of unmerged RLRR, merged RLRR and the base model; merge time; adapter size.

Every figure of one table is measured in the same run, same backbone, batch and threads, and printed
as a ratio.  Each training configuration runs in its own subprocess so that peak memory (CPU: peak
RSS from VmHWM; CUDA: max allocated) belongs to that configuration alone.

    python benchmarks/speed_memory.py                          # CPU defaults (ViT-B @ 112, ViT-Ti @ 224)
    python benchmarks/speed_memory.py --device cuda --batch 64 --cases vit_base_patch16_224@224
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rlrr
from rlrr.engine.compile import compiled
from rlrr.engine.memory import saved_activation_bytes
from timing import best_interleaved, median_seconds, sync

TRAIN_METHODS = ("frozen", "full", "lora", "rlrr")


def build(model: str, img: int, method: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = rlrr.create_backbone(model, weights=None, num_classes=100, img_size=img)
    if method == "frozen":
        m.requires_grad_(False)
    elif method != "base":
        m = rlrr.apply(m, rlrr.make_config(method, **({"rank": 8} if method == "lora" else {})))
    return m.to(device)


def train_step_child(model: str, img: int, method: str, batch: int, steps: int, device: str, compile_: bool) -> dict:
    """Median training-step time and peak memory of one configuration (run in a fresh process)."""
    m = build(model, img, method, device).train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-4) if params else None
    step_fn = compiled(m, "inductor" if compile_ else "none")  # the path --compile takes
    x = torch.randn(batch, 3, img, img, device=device, requires_grad=method == "frozen")
    y = torch.randint(0, 100, (batch,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(step_fn(x), y)
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None
    step_s = median_seconds(step, steps, device, warmup=2)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()
    saved = None if compile_ else saved_activation_bytes(lambda: m(x), [*m.parameters(), *m.buffers(), x])
    return {"step_s": step_s, "peak_bytes": peak, "saved_bytes": saved}


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across fork+exec,
    so a child started by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.no_grad()
def eval_throughput(model: str, img: int, batch: int, reps: int, device: str) -> dict:
    base = build(model, img, "base", device).eval()
    adapted = build(model, img, "rlrr", device).eval()
    to_merge = build(model, img, "rlrr", device)
    t = time.perf_counter()
    merged = rlrr.merge(to_merge)  # folding only; building the model is not part of merge time
    sync(device)
    merge_s = time.perf_counter() - t
    merged.eval()
    x = torch.randn(batch, 3, img, img, device=device)
    res = best_interleaved({"base": lambda: base(x), "merged": lambda: merged(x), "unmerged": lambda: adapted(x)},
                           reps, device)
    with tempfile.TemporaryDirectory() as d:
        size = rlrr.save_adapter(adapted, Path(d) / "a.safetensors").stat().st_size
    return {"img_per_s": {k: batch / v for k, v in res.items()}, "merge_s": merge_s, "adapter_bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="vit_base_patch16_224@112,vit_tiny_patch16_224@224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="independent processes per configuration")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd RLRR and full steps")
    ap.add_argument("--child", nargs=7, metavar=("MODEL", "IMG", "METHOD", "BATCH", "STEPS", "DEVICE", "COMPILE"))
    a = ap.parse_args()
    if a.child:
        model, img, method, batch, steps, device, comp = a.child
        print(json.dumps(train_step_child(model, int(img), method, int(batch), int(steps), device, comp == "1")))
        return
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, batch {a.batch}, "
          f"median of {a.steps} steps, median over {a.repeats} processes")
    report = {}
    for case in a.cases.split(","):
        model, img = case.split("@")
        rows = {}
        variants = [(m, False) for m in TRAIN_METHODS] + ([("rlrr", True), ("full", True)] if a.compile else [])
        for method, comp in variants:
            runs = [run_child([model, img, method, str(a.batch), str(a.steps), a.device, "1" if comp else "0"])
                    for _ in range(a.repeats)]
            rows[method + ("+compile" if comp else "")] = {
                "step_s": statistics.median(r["step_s"] for r in runs),
                "peak_mb": statistics.median(r["peak_bytes"] for r in runs) / 2**20,
                "saved_mb": None if comp else runs[0]["saved_bytes"] / 2**20}
        ev = eval_throughput(model, int(img), a.batch * 2, 5, a.device)
        r, f, lo = rows["rlrr"], rows["full"], rows["lora"]
        print(f"\n## {model} @ {img}px")
        print(f"{'train step':<22}{'ms':>9}{'peak MB':>10}{'saved MB':>10}")
        for k, v in rows.items():
            saved = "" if v["saved_mb"] is None else f"{v['saved_mb']:.0f}"
            print(f"{k:<22}{v['step_s'] * 1e3:>9.1f}{v['peak_mb']:>10.0f}{saved:>10}")
        ips = ev["img_per_s"]
        print(f"RLRR / full step      {r['step_s'] / f['step_s']:.3f}  (target <= 1.00)")
        print(f"RLRR / LoRA-8 step    {r['step_s'] / lo['step_s']:.3f}  (target <= 1.25)")
        print(f"RLRR / LoRA-8 memory  {r['peak_mb'] / lo['peak_mb']:.3f}  (target <= 1.10; saved for backward "
              f"{r['saved_mb'] / lo['saved_mb']:.3f})")
        print(f"eval img/s: base {ips['base']:.1f}, merged {ips['merged']:.1f}, unmerged {ips['unmerged']:.1f}")
        print(f"merged / base eval time    {ips['base'] / ips['merged']:.3f}  (target 1.00 within noise)")
        print(f"unmerged / base eval time  {ips['base'] / ips['unmerged']:.3f}  (target <= 1.05)")
        print(f"merge {ev['merge_s'] * 1e3:.0f} ms (target < 1 s); adapter file {ev['adapter_bytes'] / 1e6:.2f} MB")
        if a.compile:
            print(f"torch.compile: RLRR step x{rows['rlrr']['step_s'] / rows['rlrr+compile']['step_s']:.2f} faster, "
                  f"full step x{f['step_s'] / rows['full+compile']['step_s']:.2f} faster")
        report[case] = {"train": rows, **ev}
    out = Path(os.environ.get("BENCH_JSON", Path(__file__).with_name("last_speed_memory.json")))
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
