"""One adapted linear layer against its cost floor: forward + backward time and the bytes autograd keeps
between them, for the RLRR layer, the textbook autograd formula, a fully trained linear (the
three-GEMM floor: forward, input gradient, weight gradient) and a frozen linear (two GEMMs).

Whole-model ratios (``speed_memory.py``) mix in attention, norms and the optimizer; this isolates what
the RLRR op itself adds on top of the GEMMs.

    python benchmarks/layer_floor.py                       # ViT-B fc1 (768 -> 3072), 16 x 50 and 16 x 197 tokens
    python benchmarks/layer_floor.py --device cuda --tokens 64x197
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rlrr.engine.memory import saved_activation_bytes
from rlrr.methods.rlrr import RescaledLinear
from timing import best_interleaved


class Naive(nn.Module):
    """W' = W + (s_l s_rᵀ) ⊙ W written as plain autograd: W', S and their grads are graph tensors."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight, self.bias = base.weight.requires_grad_(False), base.bias.requires_grad_(False)
        self.s_l = nn.Parameter(torch.randn(base.out_features, 1))
        self.s_r = nn.Parameter(torch.randn(1, base.in_features))
        self.f = nn.Parameter(torch.zeros(base.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + (self.s_l @ self.s_r) * self.weight, self.bias + self.f)


def variants(in_f: int, out_f: int, device: str) -> dict[str, nn.Module]:
    def base() -> nn.Linear:
        torch.manual_seed(0)
        return nn.Linear(in_f, out_f, device=device)
    frozen = base().requires_grad_(False)
    return {"frozen linear (2 GEMMs)": frozen, "trained linear (3-GEMM floor)": base(),
            "RLRR op": RescaledLinear(base()).to(device), "naive autograd": Naive(base()).to(device),
            # the design space's variants (issue 17) go through the same op
            "RLRR op, scales=left": RescaledLinear(base(), scales="left").to(device),
            "RLRR op, residual=False": RescaledLinear(base(), residual=False).to(device),
            "RLRR op, form=additive": RescaledLinear(base(), form="additive").to(device)}


def train_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of ``layer`` with fresh gradients each call (no accumulation pass)."""
    params = list(layer.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(g)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="768x3072", help="IN x OUT of the linear (default: ViT-B fc1)")
    ap.add_argument("--tokens", default="16x50,16x197", help="batch x tokens, comma-separated")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    in_f, out_f = (int(v) for v in a.shape.split("x"))
    print(f"torch {torch.__version__}, {a.device}, threads {torch.get_num_threads()}, linear {in_f} -> {out_f}, "
          f"median of {a.reps}; W is {in_f * out_f * 4 / 2**20:.1f} MiB")
    layers = variants(in_f, out_f, a.device)
    for spec in a.tokens.split(","):
        b, n = (int(v) for v in spec.split("x"))
        x = torch.randn(b, n, in_f, device=a.device, requires_grad=True)
        g = torch.randn(b, n, out_f, device=a.device)
        rows = best_interleaved({name: train_step(layer, x, g) for name, layer in layers.items()}, a.reps, a.device,
                                warmup=2)
        floor = rows["trained linear (3-GEMM floor)"]
        print(f"\n{b} x {n} tokens     fwd+bwd ms   / floor   saved for backward (MiB)")
        for name, t in rows.items():
            layer = layers[name]
            mib = saved_activation_bytes(lambda: layer(x), [*layer.parameters(), x]) / 2**20
            print(f"{name:<30}{t * 1e3:>9.2f}{t / floor:>9.3f}{mib:>12.2f}")


if __name__ == "__main__":
    main()
