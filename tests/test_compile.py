"""torch.compile of an RLRR model: same outputs and gradients as eager (tiny ViT, CPU)."""
import torch
from conftest import tiny

import rlrr


def test_compiled_rlrr_matches_eager():
    model, x, *_ = tiny("vit")
    model = rlrr.apply(model, rlrr.RLRRConfig()).train()
    compiled = torch.compile(model, backend="aot_eager")  # traces the custom autograd op; no C++ build needed
    y_eager = model(x)
    y_eager.square().mean().backward()
    g_eager = {n: p.grad.clone() for n, p in rlrr.trainable_parameters(model)}
    model.zero_grad(set_to_none=True)
    y_comp = compiled(x)
    y_comp.square().mean().backward()
    assert torch.allclose(y_comp, y_eager, atol=1e-5)
    for n, p in rlrr.trainable_parameters(model):
        assert torch.allclose(p.grad, g_eager[n], atol=1e-5), n
