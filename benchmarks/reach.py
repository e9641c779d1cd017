"""What structure discovery finds in real-size architectures: the README's reach table.

Builds each model at its named size with random weights (timm's own configs; nothing downloaded),
runs ``rlrr.backbones.discover`` and applies RLRR, and prints one markdown row per model: blocks,
targets (leaf names), norms, RLRR parameters without the head.  The tiny members of the same
families are what tests/test_reach.py and tests/test_hf.py train, merge and round-trip.

    python benchmarks/reach.py > /tmp/reach.md
"""
from __future__ import annotations

import collections
import sys

import timm
import torch

import rlrr
from rlrr.backbones.discover import discover

TIMM = ["vit_base_patch16_224", "deit_base_distilled_patch16_224", "eva02_base_patch14_224", "beit_base_patch16_224",
        "cait_s24_224", "xcit_small_12_p16_224", "convit_base", "pit_b_224", "swin_base_patch4_window7_224",
        "hiera_base_224", "maxvit_rmlp_tiny_rw_256", "coatnet_0_rw_224", "fastvit_sa12", "convnext_base", "resnet50",
        "regnetx_032", "efficientnet_b0", "mobilenetv3_large_100", "levit_256",
        # issue #19's round: norms without a shift, Affine, bare Sequential blocks, nested and branch norms, GRN
        "swinv2_tiny_window8_256", "aimv2_large_patch14_224", "caformer_s18", "convformer_s18", "resmlp_12_224",
        "convmixer_768_32", "efficientvit_m0", "mobileone_s0", "ghostnet_100", "repvit_m1", "shvit_s1",
        "res2net50_14w_8s", "hgnetv2_b0", "convnextv2_tiny",
        # register tokens (DINOv2 with registers); an MLP that also takes the feature size (PVTv2)
        "vit_base_patch14_reg4_dinov2", "pvt_v2_b2"]


def hf_models() -> dict[str, torch.nn.Module]:
    """The HF classes at their configs' default (base) sizes; CLIP as ViT-B/16's vision tower."""
    import transformers as T
    return {"hf ViT (ViT-B/16)": T.ViTForImageClassification(T.ViTConfig()),
            "hf DeiT (base)": T.DeiTForImageClassification(T.DeiTConfig()),
            "hf DINOv2 (base)": T.Dinov2ForImageClassification(T.Dinov2Config()),
            "hf Swin (tiny)": T.SwinForImageClassification(T.SwinConfig()),
            "hf ConvNeXt (tiny)": T.ConvNextForImageClassification(T.ConvNextConfig()),
            "hf CLIP vision (ViT-B/16)": T.CLIPForImageClassification(T.CLIPConfig(vision_config={"patch_size": 16})),
            "hf Swin V2 (tiny)": T.Swinv2ForImageClassification(T.Swinv2Config()),
            "hf SigLIP vision (base)": T.SiglipForImageClassification(T.SiglipConfig()),
            "hf Data2Vec vision (base)": T.Data2VecVisionForImageClassification(T.Data2VecVisionConfig()),
            "hf Hiera (tiny)": T.HieraForImageClassification(T.HieraConfig()),
            "hf PVTv2 (b0)": T.PvtV2ForImageClassification(T.PvtV2Config()),
            "hf ResNet (50)": T.ResNetForImageClassification(T.ResNetConfig()),
            "hf RegNet (y-040)": T.RegNetForImageClassification(T.RegNetConfig()),
            "hf MobileNetV2 (1.0)": T.MobileNetV2ForImageClassification(T.MobileNetV2Config()),
            "hf EfficientNet (b7 config)": T.EfficientNetForImageClassification(T.EfficientNetConfig())}


def leaf_counts(names: tuple[str, ...], limit: int = 6) -> str:
    c = collections.Counter(n.rsplit(".", 1)[-1] for n in names)
    parts = [f"{k}×{v}" for k, v in c.most_common(limit)]
    return ", ".join(parts) + (f", +{len(c) - limit} more" if len(c) > limit else "")


def row(name: str, model: torch.nn.Module) -> str:
    found = discover(model)
    params = rlrr.summary(rlrr.apply(model, rlrr.RLRRConfig()))["method_params"]
    return (f"| {name} | {type(model).__name__} | {len(found.blocks)} | {len(found.targets)}: {leaf_counts(found.targets)} "
            f"| {len(found.norms)} | {params:,} |")


def main() -> None:
    torch.set_grad_enabled(True)
    print("| model (named size) | class | blocks | targets (leaf names) | norms rescaled | RLRR params |")
    print("|---|---|---|---|---|---|")
    for name in TIMM:
        print(row(name, timm.create_model(name, pretrained=False).eval()), flush=True)
    for name, model in hf_models().items():
        print(row(name, model.eval()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
