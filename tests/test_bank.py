"""The adapter bank: mixed-task batches on one backbone equal each task's own merged model."""
import copy
import random

import pytest
import timm
import torch
from conftest import one_step

import rlrr
from rlrr.adapter import AdapterMismatchError
from rlrr.backbones import set_num_classes
from rlrr.serving.bank import AdapterBank

# task: (method, options, classes)
TASKS = {
    "rlrr": ("rlrr", {}, 5),
    "rlrr_rank2": ("rlrr", {"rank": 2}, 7),
    "rlrr_fused": ("rlrr", {"qkv": "fused"}, 3),
    "ssf": ("ssf", {}, 4),
    "bitfit": ("bitfit", {}, 6),
    "lora": ("lora", {}, 2),
    "lora_qkv": ("lora", {"targets": ["qkv", "fc1"], "rank": 4}, 5),
    "linear": ("linear", {}, 9),
}
FAMILIES = {
    "vit": (lambda n: rlrr.create_backbone("vit_pico_patch4_32", weights="pretrained", num_classes=n), 32),
    "swin": (lambda n: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=n, img_size=56,
                                         embed_dim=24, depths=(1, 1), num_heads=(1, 2)), 56),
    "convnext": (lambda n: timm.create_model("convnext_atto", pretrained=False, num_classes=n, depths=(1, 1, 1, 1),
                                             dims=(8, 16, 24, 32)), 32),
}


def backbone(family: str, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)  # every copy the same weights (the fingerprint says so), then the task's own head
    model = FAMILIES[family][0](3).eval()
    set_num_classes(model, classes)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory):
    """Each task's adapter, trained a few steps so that every vector is away from its init, and the merged
    model it stands for."""
    family = request.param
    side = FAMILIES[family][1]
    folder = tmp_path_factory.mktemp(family)
    out = {}
    for i, (name, (method, opts, classes)) in enumerate(TASKS.items()):
        if family != "vit" and method == "lora" and name != "lora_qkv" or (family == "convnext" and "lora" in name):
            continue  # LoRA's q/v roles: transformers only; ConvNeXt has no Linear q/v
        model = rlrr.apply(backbone(family, classes), rlrr.make_config(method, **opts))
        torch.manual_seed(i)
        x = torch.randn(4, 3, side, side)
        for _ in range(3):
            one_step(model, x)
        path = rlrr.save_adapter(model, folder / f"{name}.safetensors")
        out[name] = (path, rlrr.merge(copy.deepcopy(model)).eval() if method != "linear" else model.eval())
    return family, out


def check(bank: AdapterBank, refs: dict, tasks: list[str], side: int, seed: int = 0) -> None:
    x = torch.randn(len(tasks), 3, side, side, generator=torch.Generator().manual_seed(seed))
    got = bank(x, tasks)
    for i, t in enumerate(tasks):
        with torch.no_grad():
            want = refs[t](x[i:i + 1])[0]
        assert got[i].shape == want.shape, t
        assert float((got[i] - want).norm() / want.norm()) <= 1e-5, (t, i)


@pytest.mark.parametrize("mode", ["auto", "shared", "grouped"])
def test_mixed_batches_equal_each_tasks_merged_model(trained, mode):
    family, tasks = trained
    side = FAMILIES[family][1]
    bank = AdapterBank(backbone(family), {n: p for n, (p, _) in tasks.items()}, mode=mode)
    refs = {n: m for n, (_, m) in tasks.items()}
    names = list(tasks)
    mixed = names * 2
    random.Random(0).shuffle(mixed)
    check(bank, refs, mixed, side)  # shuffled, several tasks, different class counts
    check(bank, refs, names, side, seed=1)  # one sample per task
    check(bank, refs, [names[0]] * 5, side, seed=2)  # a batch of one task
    many = [names[1]] * 8 + [names[2]] * 9  # enough samples per task that "auto" runs each task on its own
    random.Random(1).shuffle(many)
    check(bank, refs, many, side, seed=6)
    check(bank, refs, [names[-1]], side, seed=3)  # a single image


def test_tasks_are_added_and_removed_at_run_time(trained):
    family, tasks = trained
    side = FAMILIES[family][1]
    names = list(tasks)
    refs = {n: m for n, (_, m) in tasks.items()}
    bank = AdapterBank(backbone(family), {names[0]: tasks[names[0]][0]})
    check(bank, refs, [names[0]] * 2, side)
    for n in names[1:]:
        bank.add(n, tasks[n][0])
    bank.remove(names[1])
    left = [n for n in names if n != names[1]]
    check(bank, refs, left, side, seed=4)
    bank.add(names[1], tasks[names[1]][0])  # back again, now in the last slot
    check(bank, refs, names[::-1], side, seed=5)
    with pytest.raises(KeyError, match="no task 'nope'"):
        bank(torch.randn(1, 3, side, side), ["nope"])
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add(names[0], tasks[names[0]][0])


def test_the_bank_refuses_what_it_cannot_serve(tmp_path):
    full = rlrr.apply(backbone("vit"), rlrr.make_config("full"))
    path = rlrr.save_adapter(full, tmp_path / "full.safetensors")
    bank = AdapterBank(backbone("vit"))
    with pytest.raises(AdapterMismatchError, match="full adapters cannot be served per sample") as e:
        bank.add("full", path)
    assert "\n" not in str(e.value)
    torch.manual_seed(1)
    moved = rlrr.create_backbone("vit_pico_patch4_32", weights=None, num_classes=3)  # other backbone weights
    path = rlrr.save_adapter(rlrr.apply(moved, rlrr.RLRRConfig()), tmp_path / "other.safetensors")
    with pytest.raises(AdapterMismatchError, match="trained on backbone weights"):
        bank.add("other", path)
    assert not bank.tasks


def test_an_empty_batch_is_an_empty_answer_and_another_architecture_is_named_before_its_size(tmp_path):
    bank = AdapterBank(backbone("vit"))
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=64, patch_size=16,
                              embed_dim=48, depth=2, num_heads=3)  # another architecture, trained at another size
    path = rlrr.save_adapter(rlrr.apply(other, rlrr.RLRRConfig()), tmp_path / "tiny.safetensors")
    with pytest.raises(AdapterMismatchError) as e:
        bank.add("tiny", path)
    assert "trained on vit_tiny_patch16_224 but this model is vit_pico_patch4_32" in str(e.value)
    assert "input size" not in str(e.value) and "--img-size" not in str(e.value)
    bank.add("mine", rlrr.save_adapter(rlrr.apply(backbone("vit"), rlrr.RLRRConfig()), tmp_path / "mine.safetensors"))
    assert bank(torch.randn(0, 3, 32, 32), []) == []


def test_a_compiled_bank_serves_any_task_mix_with_one_graph(trained):
    """Compiled, every batch runs the per-row form: the same logits as each task's merged model, and no new
    graph for a new task mix, batch size or task set of the same shapes (only the first batch compiles)."""
    from torch._dynamo.utils import counters
    family, tasks = trained
    side = FAMILIES[family][1]
    names = list(tasks)
    refs = {n: m for n, (_, m) in tasks.items()}
    if family == "convnext":  # RLRR rescales ConvNeXt's convs, which have no per-row form
        bank = AdapterBank(backbone(family), compile="aot_eager")
        with pytest.raises(AdapterMismatchError, match="rescales convolutions .* without --compile") as e:
            bank.add("rlrr", tasks["rlrr"][0])
        assert "\n" not in str(e.value) and not bank.tasks
        return
    bank = AdapterBank(backbone(family), {n: p for n, (p, _) in tasks.items()}, compile="aot_eager")
    mixed = names * 2
    random.Random(0).shuffle(mixed)
    check(bank, refs, mixed, side)
    graphs = counters["stats"]["unique_graphs"]
    check(bank, refs, names, side, seed=1)
    check(bank, refs, [names[0]] * 5, side, seed=2)
    bank.remove(names[1])
    bank.add(names[1], tasks[names[0]][0])  # another task's tensors in a slot of the same shapes
    refs = {**refs, names[1]: refs[names[0]]}
    check(bank, refs, names[::-1] + names[:3], side, seed=5)
    assert counters["stats"]["unique_graphs"] == graphs
    check(bank, refs, [names[-1]], side, seed=3)  # a single image (torch specialises size 1: may compile once)
