"""The README's peft tuner table: each verified tuner on ViT-B/16 at its named size (random weights,
nothing downloaded) with peft's defaults on the discovered block linears — trainable parameters
without the head, and whether ``rlrr.merge`` folds it back into the plain model (relative error of
the merged logits on one image).  tests/test_zoo.py checks the same tuners on a tiny ViT.

    python benchmarks/peft_tuners.py > /tmp/peft.md
"""
from __future__ import annotations

import sys
import warnings

import timm
import torch

import rlrr
from rlrr.methods.base import MergeError
from rlrr.methods.peft import VERIFIED

# Options a tuner needs on ViT-B (its default does not fit) or that pick peft's documented setting.
OPTIONS = {"boft": {"boft_block_size": 4}}


def row(tuner: str, x: torch.Tensor) -> str:
    torch.manual_seed(0)
    model = rlrr.apply(timm.create_model("vit_base_patch16_224", pretrained=False),
                       rlrr.make_config(f"peft:{tuner}", **OPTIONS.get(tuner, {})))
    model.eval()  # the tuner's new layers start in train mode (PVeRA samples there)
    params = rlrr.summary(model)["method_params"]
    with torch.no_grad():
        for p in rlrr.trainable_parameters(model):  # move off the zero start so a merge has work to do
            p[1].add_(torch.randn_like(p[1]), alpha=1e-3)
        ref = model(x)
        try:
            err = (rlrr.merge(model)(x) - ref).norm() / ref.norm()
            merges = f"yes ({err:.0e})"
        except MergeError as e:
            merges = f"no: {e}"
    opts = ", ".join(f"{k} {v}" for k, v in OPTIONS.get(tuner, {}).items()) or "defaults"
    return f"| `peft:{tuner}` | {opts} | {params:,} | {merges} |"


def main() -> None:
    warnings.filterwarnings("ignore")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    print("| tuner | options | params (ViT-B/16, no head) | merges (rel. error) |")
    print("|---|---|---|---|")
    for tuner in VERIFIED:
        print(row(tuner, x), flush=True)


if __name__ == "__main__":
    sys.exit(main())
