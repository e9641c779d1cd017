"""Self-supervised checkpoints in their released layouts (MAE, MoCo v3, DINO), written by hand from a
timm ViT's own weights: `--weights` loads the encoder, and the model equals the same weights loaded the
timm way."""
import pytest
import timm
import torch

import rlrr

NAME, KW = "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def encoder() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = timm.create_model(NAME, pretrained=False, num_classes=0, **KW).state_dict()
    return {k: v.clone() for k, v in sd.items()}


def layouts(sd: dict) -> dict[str, dict]:
    junk = torch.randn(4, 4)
    return {
        "mae": {"model": {**sd, "mask_token": torch.zeros(1, 1, 48), "decoder_embed.weight": junk,
                          "decoder_blocks.0.mlp.fc1.weight": junk, "decoder_pred.weight": junk}},
        "moco_v3": {"epoch": 300, "state_dict": {
            **{f"module.base_encoder.{k}": v for k, v in sd.items()},
            **{f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()},
            "module.base_encoder.head.0.weight": torch.randn(64, 48), "module.predictor.0.weight": junk}},
        "dino": {"student": {f"backbone.{k}": v + 1 for k, v in sd.items()},
                 "teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                             "head.mlp.0.weight": torch.randn(64, 48), "head.last_layer.weight_g": junk}},
    }


@pytest.mark.parametrize("layout", ["mae", "moco_v3", "dino"])
def test_self_supervised_checkpoints_load_their_encoder(layout, tmp_path):
    sd = encoder()
    path = tmp_path / f"{layout}.pth"
    torch.save(layouts(sd)[layout], path)
    model = rlrr.create_backbone(NAME, weights=str(path), num_classes=5, **KW)
    torch.manual_seed(1)
    ref = timm.create_model(NAME, pretrained=False, num_classes=5, **KW)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    own = model.state_dict()
    for k, v in sd.items():
        assert (own[k] - v).abs().max() <= 1e-6, k
    assert rlrr.summary(rlrr.apply(model, rlrr.RLRRConfig()))["method_params"] > 0
