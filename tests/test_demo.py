"""The README's first command, shortened: a real fine-tuning of the shipped pretrained backbone."""
import json

import torch

import rlrr
from rlrr.backbones import EMBEDDED_DIR, EMBEDDED_NAME
from rlrr.cli import main


def test_shipped_backbone_is_really_pretrained():
    weights = EMBEDDED_DIR / f"{EMBEDDED_NAME}.fractal.safetensors"
    assert weights.is_file() and weights.stat().st_size < 5e6
    log = json.loads(weights.with_name(f"{EMBEDDED_NAME}.fractal.log.json").read_text())
    assert log["log"][-1]["val_acc"] > 50  # it learned its 100 fractal classes (chance: 1%)
    pre = rlrr.create_backbone(EMBEDDED_NAME, weights="pretrained", num_classes=10)
    torch.manual_seed(0)
    rnd = rlrr.create_backbone(EMBEDDED_NAME, weights=None, num_classes=10)
    assert not torch.equal(pre.blocks[0].attn.qkv.weight, rnd.blocks[0].attn.qkv.weight)


def test_quick_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rlrr" in out and "linear" in out and "untrained" in out
    res = json.loads((tmp_path / "demo.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    chance = 100 / 10
    assert rows["rlrr"]["test_acc"] > max(2 * chance, res["untrained_test_acc"] + 10)
    assert rows["rlrr"]["trainable_params"] == 25_610
    for f in ("curves.png", "rlrr/adapter.safetensors", "linear/summary.json"):
        assert (tmp_path / f).is_file(), f
