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


def test_mae_fine_tuned_checkpoint_with_global_pool_fc_norm_loads_where_it_was_trained(tmp_path):
    """MAE's fine-tuned release: {"model": ...} with `fc_norm` (global average pooling) and no final `norm`;
    the backbone is built with global_pool="avg" and equals the same weights loaded the timm way."""
    torch.manual_seed(0)
    trained = timm.create_model(NAME, pretrained=False, num_classes=7, global_pool="avg", **KW).eval()
    sd = trained.state_dict()
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    path = tmp_path / "mae_finetuned_vit.pth"
    torch.save({"model": sd, "epoch": 99}, path)
    model = rlrr.create_backbone(NAME, weights=str(path), num_classes=7, **KW).eval()
    assert model.global_pool == "avg"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - trained(x)).abs().max() <= 1e-6
    fresh = rlrr.apply(rlrr.create_backbone(NAME, weights=str(path), num_classes=7, **KW), rlrr.RLRRConfig())
    assert "fc_norm" in {n.split(".")[0] for n, p in fresh.named_parameters() if p.requires_grad}  # SSF after fc_norm
