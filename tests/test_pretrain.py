"""Formula-driven pre-training at FractalDB-1k scale: the data's block rule, and backbones of our own sizes."""
import numpy as np
import pytest
import torch

from rlrr.backbones import create_backbone
from rlrr.cli import main
from rlrr.data.synthetic import fractal_images


def test_more_classes_extend_the_data_the_same_whatever_the_worker_count():
    small, small_labels = fractal_images(100, 2)
    big, big_labels = fractal_images(120, 2, workers=2)  # blocks of 100: the second comes from seed 1
    assert np.array_equal(big[:200], small) and np.array_equal(big_labels[:200], small_labels)
    assert np.array_equal(big_labels, np.repeat(np.arange(120), 2))
    assert np.array_equal(fractal_images(120, 2)[0], big)  # one process: the same images
    upright, upright_labels = fractal_images(100, 2, rotate=False)
    assert np.array_equal(upright_labels, small_labels) and not np.array_equal(upright, small)


def test_a_backbone_of_another_size_is_pretrained_and_loaded_by_its_file(tmp_path, capsys):
    out = tmp_path / "nano"
    assert main(["pretrain", "--model", "vit_nano_patch4_32", "--upright", "--classes", "4", "--per-class", "20",
                 "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0", "--output", str(out)]) == 0
    weights = out / "vit_nano_patch4_32.fractal.safetensors"
    model = create_backbone("vit_nano_patch4_32", weights=str(weights), num_classes=3)
    assert model.embed_dim == 192 and len(model.blocks) == 6
    torch.manual_seed(0)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, create_backbone("vit_nano_patch4_32", None).blocks[0]
                           .attn.qkv.weight)
    capsys.readouterr()
    # "pretrained" (the default) for one of ours with no shipped file: said, not a silent random backbone
    assert main(["train", "--model", "vit_nano_patch4_32", "--data", "offline:mnist:200", "--epochs", "1",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: vit_nano_patch4_32 has no shipped weights") and "--weights DIR/" in err
    assert "\n" not in err
    # a tag that does not ship: one line naming those that do
    assert main(["train", "--data", "offline:mnist:200", "--weights", "pretrained:fractal10k", "--epochs", "1",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no shipped weights 'fractal10k' (shipped: pretrained:fractal, pretrained:fractal1k)" in err and "\n" not in err
    # a batch larger than the data would train on nothing: refused, naming the fix
    assert main(["pretrain", "--classes", "2", "--per-class", "5", "--output", str(tmp_path / "tiny")]) == 2
    assert "--batch-size 128 is more than the 10 training images" in capsys.readouterr().err


def test_pretrained_tag_names_timms_tagged_weights(monkeypatch):
    """``--weights pretrained:TAG`` on a timm model is timm's ``<model>.TAG``: an unknown tag is one line naming
    the tags there are; a known one is asked of timm's pretrained path by that name (its download is timm's)."""
    from rlrr.backbones import BackboneError, create_backbone
    with pytest.raises(BackboneError) as e:
        create_backbone("vit_tiny_patch16_224", "pretrained:bogus")
    assert "no pretrained weights 'bogus' for vit_tiny_patch16_224" in str(e.value)
    assert "pretrained:augreg_in21k" in str(e.value) and "\n" not in str(e.value)
    import timm
    asked = []

    def offline(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        raise OSError("no network")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneError) as e:
        create_backbone("vit_tiny_patch16_224", "pretrained:augreg_in21k")
    assert asked == [("vit_tiny_patch16_224.augreg_in21k", True)]
    assert "huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k/" in str(e.value)  # the file to fetch by hand
