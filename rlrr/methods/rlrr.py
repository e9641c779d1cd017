"""RLRR: residual-based low-rank rescaling (Dong et al., CVPR 2024).

Every target weight ``W`` becomes ``W' = W + (s_l s_rᵀ) ⊙ W`` and its bias ``b' = b + f``; SSF-style
feature rescaling follows the norms and the patch embedding, as in the official code.

Layout.  The rank-1 scale is defined on a *matrix view* of the weight:
* Linear ``(out, in)`` split into ``groups`` row blocks, each with its own ``s_r`` — a fused qkv with
  3 groups is exactly the official ViT's three separate q, k, v layers; 1 group is the official Swin's
  fused qkv with one shared ``s_r``.
* Conv ``(out, in, k, k)`` viewed as ``(out·k) × (in·k)`` (permuted to ``(out, k, in, k)``), as in the
  official ResNet variant.
Parameters are stored as ``scale_l (rank, groups, rows)`` and ``scale_r (rank, groups, cols)``;
``rank > 1`` sums several rank-1 rescalings (our extension).

Variants (the paper's ablations, ``RLRRConfig``): ``scales="left"`` / ``"right"`` keeps the other
vector at ones (a buffer, not trained: S = s_l 1ᵀ or 1 s_rᵀ); ``residual=False`` drops the ``+ W``
(W' = S ⊙ W); ``form="additive"`` is Supp. Table 11's "w/o W", W' = W + S.  ``compose`` is the one
place that says how a variant builds W'; the op, the cache and ``merged()`` all go through it.

Cost.  ``_RescaledOp`` forms W' once per call, runs one GEMM/conv, and in backward recomputes W'
instead of keeping one alive per layer; the scale gradients come from ``dW' ⊙ W`` reduced against
the other vector — the same three GEMM-sized products as full fine-tuning.  With gradients off,
W' is cached until a parameter changes, so unmerged inference costs what the base model costs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.discover import SITES, conv_padding, resolve, select
from .base import Method, NotServable, freeze, merge_modules, register, replace
from .ssf import inject_feature_rescale, merge_feature_rescale


_WORKSPACES = threading.local()


def workspace(like: torch.Tensor) -> torch.Tensor:
    """One reusable buffer per weight shape for W' while a layer's forward or backward runs.

    W' lives only for one GEMM/conv, so layers of one shape can share a buffer (per thread); a fresh
    weight-sized tensor per call costs page faults on the CPU (≈0.4 ms for ViT-B's fc1, measured).
    Never returned or kept: the cached inference W' and ``merged`` allocate their own.  (Writing
    dL/dW' into a second buffer with ``mm(out=)`` measured slower than letting the GEMM allocate.)
    """
    bufs = getattr(_WORKSPACES, "bufs", None) or _WORKSPACES.__dict__.setdefault("bufs", {})
    key = (like.shape, like.dtype, like.device)
    if key not in bufs:
        bufs[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
    return bufs[key]


class _RescaledOp(torch.autograd.Function):
    """y = op(x, W ⊙ (1 + S), b + f) with S built from (s_l, s_r); see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale_l, scale_r, shift, layer: "_Rescaled"):
        w_eff = layer.compose(weight, scale_l, scale_r, out=workspace(weight)).to(x.dtype)
        b_eff = None if bias is None else (bias + shift).to(x.dtype)
        ctx.layer = layer
        ctx.save_for_backward(x, weight, bias, scale_l, scale_r, shift)
        return layer.op_fresh(x, w_eff, b_eff)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, scale_l, scale_r, shift = ctx.saved_tensors
        layer: _Rescaled = ctx.layer
        need = ctx.needs_input_grad
        w_eff = layer.compose(weight, scale_l, scale_r, out=workspace(weight)).to(x.dtype)
        gx, gw_eff = layer.op_backward(grad_out, x, w_eff, need[0], any(need[1:5]))
        del w_eff
        g_w = g_l = g_r = g_b = g_f = None
        if gw_eff is not None:
            gw_eff = gw_eff.to(weight.dtype)
            if need[1]:  # dW'/dW: 1 + S, S, or 1 (additive)
                g_w = gw_eff.clone() if layer.form == "additive" else \
                    layer.rescaled(gw_eff, scale_l, scale_r, plus=gw_eff if layer.residual else None)
            # dL/dS in matrix form (⊙ W in place for the rescaling forms: dL/dW' is done)
            gm = layer.to_matrix(gw_eff if layer.form == "additive" else gw_eff.mul_(weight))
            if need[3]:
                g_l = torch.einsum("goi,rgi->rgo", gm, scale_r)
            if need[4]:
                g_r = torch.einsum("goi,rgo->rgi", gm, scale_l)
        if need[2] or need[5]:
            gsum = grad_out.sum(dim=[d for d in range(grad_out.ndim) if d != layer.channel_dim % grad_out.ndim])
            g_b = gsum.to(bias.dtype) if need[2] else None
            g_f = gsum.to(shift.dtype) if need[5] else None
        return gx, g_w, g_b, g_l, g_r, g_f, None


# Supp. Table 10's rows: torch.nn.init's functions at their defaults (the paper gives no distributions)
PLAIN_INITS = {"normal": nn.init.normal_, "zero": nn.init.zeros_, "constant": lambda p: nn.init.constant_(p, 1.0),
               "uniform": nn.init.uniform_}


class _Rescaled(nn.Module):
    """Shared machinery of the rescaled Linear and Conv2d; subclasses give the matrix view and the op.

    ``weight`` / ``bias`` keep the base layer's names (frozen), so the state-dict keys of the
    pretrained weights do not move while the adapter is attached.
    """

    adapter_params = ("scale_l", "scale_r", "shift")
    channel_dim = -1

    def __init__(self, base: nn.Module, rows: int, cols: int, groups: int, rank: int, init: str,
                 scales: str = "both", residual: bool = True, form: str = "rescale"):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        self.residual, self.form = residual, form
        like = dict(dtype=self.weight.dtype, device=self.weight.device)
        for side, size, trained in (("scale_l", rows, scales != "right"), ("scale_r", cols, scales != "left")):
            if trained:
                setattr(self, side, nn.Parameter(torch.empty(rank, groups, size, **like)))
            else:  # the one-sided ablations: the other vector is ones, fixed (not saved: the config says it)
                self.register_buffer(side, torch.ones(rank, groups, size, **like), persistent=False)
        # No bias in the base layer (Swin patch merging, ResNet convs): no shift, so merge keeps the keys.
        self.shift = nn.Parameter(torch.zeros(self.weight.shape[0], **like)) if self.bias is not None else None
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._cache: tuple | None = None
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        """The trained vectors' start (``INITS``); a fixed side stays at ones."""
        trained = [(p, view) for p, view in ((self.scale_l, (-1, 1)), (self.scale_r, (1, -1)))
                   if isinstance(p, nn.Parameter)]
        if init in PLAIN_INITS:
            for p, _ in trained:
                PLAIN_INITS[init](p)
            return
        rank, groups, _ = self.scale_l.shape  # official / identity: kaiming on the official shapes, per rank-1
        for k in range(rank):                 # term and row block: (out,1) U(±√6), (1,in) fan-in = in
            for g in range(groups):
                for p, view in trained:
                    nn.init.kaiming_uniform_(p[k, g].view(view))
        if init == "identity":
            trained[0][0].zero_()

    # matrix view -------------------------------------------------------------------------------
    def to_matrix(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_matrix(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def op_fresh(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``op`` as a tensor of its own, never a view: the custom op's output may be modified in place
        by the model (Swin V2's position-bias MLP applies ``ReLU(inplace=True)``), which autograd forbids
        on a view made inside a custom Function."""
        return self.op(x, w, b)

    def op_backward(self, g, x, w, need_x: bool, need_w: bool):
        """(dL/dx, dL/dW')."""
        raise NotImplementedError

    def factors(self, scale_l: torch.Tensor, scale_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(s_l, s_r, shape): the rank-1 vectors viewed to broadcast against the weight viewed as ``shape``."""
        raise NotImplementedError

    @staticmethod
    def scale_matrix(scale_l: torch.Tensor, scale_r: torch.Tensor) -> torch.Tensor:
        return torch.einsum("rgo,rgi->goi", scale_l, scale_r)

    def rescaled(self, w: torch.Tensor, scale_l: torch.Tensor, scale_r: torch.Tensor,
                 plus: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``w ⊙ S (+ plus)`` with S = Σ_k s_l s_rᵀ in the matrix view, into ``out`` when given.  Rank 1
        (the paper) never forms S: ``w ⊙ s_l`` into the output, then ``plus + out ⊙ s_r`` in place —
        two passes over one buffer, no full-size temporary."""
        out = torch.empty_like(w) if out is None else out
        if scale_l.shape[0] != 1:
            torch.mul(w, self.from_matrix(self.scale_matrix(scale_l, scale_r), w.shape), out=out)
            return out if plus is None else out.add_(plus)
        left, right, shape = self.factors(scale_l[0], scale_r[0])
        o = out.view(shape)
        torch.mul(w.view(shape), left, out=o)
        if plus is None:
            o.mul_(right)
        else:
            torch.addcmul(plus.view(shape), o, right, out=o)
        return out

    def compose(self, w: torch.Tensor, scale_l: torch.Tensor, scale_r: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """W' of this layer's variant: ``W + S ⊙ W`` (RLRR), ``S ⊙ W`` (no residual) or ``W + S`` (additive)."""
        if self.form == "additive":
            s = self.from_matrix(self.scale_matrix(scale_l, scale_r), w.shape)
            return torch.add(w, s, out=out) if out is not None else w + s
        return self.rescaled(w, scale_l, scale_r, plus=w if self.residual else None, out=out)

    def effective(self, weight=None, bias=None, scale_l=None, scale_r=None, shift=None, dtype=None):
        """(W', b') = (``compose(W)``, b + f), in ``dtype`` (the compute dtype)."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        scale_l = self.scale_l if scale_l is None else scale_l
        scale_r = self.scale_r if scale_r is None else scale_r
        shift = self.shift if shift is None else shift
        w = self.compose(weight, scale_l, scale_r)
        b = None if bias is None else bias + shift
        dtype = dtype or weight.dtype
        return w.to(dtype), (None if b is None else b.to(dtype))

    def bank_rows(self) -> tuple[str, dict[str, torch.Tensor]]:
        """What a bank of adapters stacks for this layer (``rlrr.serving.bank``): the scale vectors and b' = b + f, at
        a weight site; each task's W' is then formed by ``weight_for``.  Only the paper's residual
        rescaling is served (the ablation variants are refused, naming the variant)."""
        if self.form != "rescale" or not self.residual:
            raise NotServable(f"RLRR's {self.form} form{'' if self.residual else ' without the residual'} (an "
                              "ablation); the bank serves the residual rescaling W + S ⊙ W only")
        rows = {"scale_l": self.scale_l, "scale_r": self.scale_r}
        if self.bias is not None:
            rows["bias"] = self.bias + self.shift
        return "weight", rows

    def weight_for(self, scale_l: torch.Tensor, scale_r: torch.Tensor, weight: torch.Tensor | None = None):
        """W' of this layer's variant and geometry for another task's vectors (a bank row), formed by
        ``compose`` into the shared per-shape workspace: valid until the next W' of that shape is formed."""
        weight = self.weight if weight is None else weight
        return self.compose(weight, scale_l, scale_r, out=workspace(weight))

    def _cached(self, dtype: torch.dtype):
        """W', b' for inference, rebuilt only when a parameter changed (tracked by tensor versions)."""
        key = (dtype, *[(p.data_ptr(), p._version) for p in self._tensors()])
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, *self.effective(dtype=dtype))
        return self._cache[1:]

    def _tensors(self):
        return [t for t in (self.weight, self.bias, self.scale_l, self.scale_r, self.shift) if t is not None]

    def train(self, mode: bool = True):
        self._cache = None  # a cached W' is only for inference; do not hold it during training
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        x = x.to(torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self._tensors()))
        if not self.training and not needs_grad:
            return self.op(x, *self._cached(x.dtype))
        with torch.autocast(dev, enabled=False):
            return _RescaledOp.apply(x, self.weight, self.bias, self.scale_l, self.scale_r, self.shift, self)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained layer's output (what PACE perturbs around)."""
        return self.op(x, self.weight, self.bias)

    def plain(self, bias: bool, **like) -> nn.Module:
        """An empty layer of the replaced kind (what ``merged`` fills with W', b')."""
        raise NotImplementedError

    def merged(self) -> nn.Module:
        """The replaced kind of layer holding W' and b': the model without the adapter's layers."""
        w, b = self.effective()
        layer = self.plain(b is not None, device=w.device, dtype=w.dtype)
        layer.weight.data.copy_(w)
        if b is not None:
            layer.bias.data.copy_(b)
        return layer.requires_grad_(False)


class RescaledLinear(_Rescaled):
    def __init__(self, base: nn.Linear, groups: int = 1, rank: int = 1, init: str = "official", **variant):
        out_f, in_f = base.weight.shape
        if out_f % groups:
            raise ValueError(f"cannot split {out_f} output rows into {groups} groups")
        self.in_features, self.out_features, self.groups = in_f, out_f, groups
        super().__init__(base, out_f // groups, in_f, groups, rank, init, **variant)

    def to_matrix(self, w):
        return w.reshape(self.groups, -1, w.shape[-1])

    def factors(self, scale_l, scale_r):
        return scale_l.unsqueeze(-1), scale_r.unsqueeze(-2), (self.groups, -1, self.in_features)

    def from_matrix(self, m, shape):
        return m.reshape(shape)

    def op(self, x, w, b):
        return F.linear(x, w, b)

    def op_fresh(self, x, w, b):
        """One GEMM on the flattened tokens written straight into the output (F.linear on a 3-D input
        returns a view of its 2-D result)."""
        y = x.new_empty(*x.shape[:-1], w.shape[0])
        flat, x2 = y.view(-1, w.shape[0]), x.reshape(-1, x.shape[-1])
        if b is None:
            torch.mm(x2, w.t(), out=flat)
        else:
            torch.addmm(b, x2, w.t(), out=flat)
        return y

    def op_backward(self, g, x, w, need_x, need_w):
        gx = g @ w if need_x else None
        gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        return gx, gw

    def plain(self, bias: bool, **like) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=bias, **like)

    def extra_repr(self) -> str:
        variant = "" if self.form == "rescale" and self.residual else f", form={self.form}, residual={self.residual}"
        return (f"in={self.in_features}, out={self.out_features}, groups={self.groups}, rank={self.scale_l.shape[0]}"
                f"{variant}")


class RescaledConv2d(_Rescaled):
    """Conv weight (out, in/g, kh, kw) viewed as (out·kh) × (in/g·kw), as the official ResNet variant does."""

    channel_dim = 1

    def __init__(self, base: nn.Conv2d, rank: int = 1, init: str = "official", **variant):
        if base.padding_mode != "zeros" or conv_padding(base) is None:
            raise ValueError("RLRR conv supports zero padding of explicit size (or 'same' with an odd kernel "
                             "at stride 1) only")
        # the attributes model code reads from the conv it replaced (TF-style padding, reparameterize())
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode"):
            setattr(self, attr, getattr(base, attr))
        self.conv = dict(stride=base.stride, padding=conv_padding(base), dilation=base.dilation, groups=base.groups)
        o, i, kh, kw = base.weight.shape
        super().__init__(base, o * kh, i * kw, 1, rank, init, **variant)

    def factors(self, scale_l, scale_r):
        o, i, kh, kw = self.weight.shape
        return scale_l.view(o, 1, kh, 1), scale_r.view(1, i, 1, kw), (o, i, kh, kw)

    def to_matrix(self, w):
        o, i, kh, kw = w.shape
        return w.permute(0, 2, 1, 3).reshape(1, o * kh, i * kw)

    def from_matrix(self, m, shape):
        o, i, kh, kw = shape
        return m.reshape(o, kh, i, kw).permute(0, 2, 1, 3)

    def op(self, x, w, b):
        return F.conv2d(x, w, b, **self.conv)

    def op_backward(self, g, x, w, need_x, need_w):
        c = self.conv
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g, x, w, None, list(c["stride"]), list(c["padding"]), list(c["dilation"]), False, [0, 0],
            c["groups"], [need_x, need_w, False])
        return gx, gw

    def plain(self, bias: bool, **like) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=bias, **like)


INITS = ("official", "identity", "normal", "zero", "constant", "uniform")
SCALES = ("both", "left", "right")
FORMS = ("rescale", "additive")


@dataclass
class RLRRConfig:
    """What RLRR adapts and how it starts; the defaults are the paper's method, the rest its design space.

    targets: regex over module names (anchored); None = the weight layers of the model's repeated
        blocks, discovered from its structure (``rlrr.backbones.discover``; ViT/Swin: attention
        qkv/proj and MLP fc1/fc2; ConvNeXt: conv_dw, fc1, fc2; ResNet: convs).
    norms: regex over module names whose outputs get the SSF rescale; None = discovered (each block's
        norms, the stem's output and the final norm).
    norm_rescale: SSF scale/shift after the norms (official code: on; off = "norm" left out of ``sites``).
    init: how the trained scale vectors start.  "official": kaiming_uniform_ on s_l viewed (out,1) and
        s_r viewed (1,in), as the paper's code (W' ≠ W at step 0); "identity": the same with s_l = 0 and
        SSF at 1/0, so the model starts exactly at the pretrained function.  Supp. Table 10's rows, whose
        distributions the paper does not give, are torch.nn.init's functions at their defaults:
        "normal" N(0, 1), "uniform" U(0, 1), "constant" 1 (with the residual W' = 2W at step 0; without
        it W' = W), "zero" 0 — then S stays 0 and neither vector gets a gradient (each one's is the other
        times dL/dS), so only f and SSF learn: the row measures exactly that.
    rank: number of rank-1 rescalings summed (1 = the paper).
    qkv: a fused qkv Linear as "split" (q, k, v each with its own s_r, the official ViT) or "fused"
        (one shared s_r, the official Swin); "auto" picks per family.
    reduction: also rescale the weight layers between blocks (Swin patch merging, ConvNeXt downsampling
        convs); None = as the official code for the layout: on for timm Swin (its code rescales patch
        merging), off elsewhere.  Timm Swin also gets no SSF after its patch embedding, as that code.
    scales: which vectors train (Table 6): "both" (S = s_l s_rᵀ), "left" (S = s_l 1ᵀ: one scale per
        output row) or "right" (S = 1 s_rᵀ: one per input column).
    residual: W' = W + S ⊙ W (True, the paper) or S ⊙ W (Table 6's rows without the residual).
    form: "rescale" (S ⊙ W, the paper) or "additive" (Supp. Table 11's "w/o W": W' = W + S, a rank-r
        update unrelated to W, LoRA-like).
    sites: where RLRR goes (Fig. 2), any of "attn" (q, k, v, proj), "mlp" (fc1, fc2) and "norm" (the
        SSF rescales); a list or a comma-separated string.  The three partition the default.
    blocks: which of the discovered blocks are adapted: None (all), "first:K", "last:K" or a list of
        indices (negative from the end).  The stem's rescale goes with block 0, the final norm's with
        the last block, a patch merging with the block after it.
    """
    method: ClassVar[str] = "rlrr"
    targets: str | None = None
    norms: str | None = None
    norm_rescale: bool = True
    init: str = "official"
    rank: int = 1
    qkv: str = "auto"
    reduction: bool | None = None
    train_head: bool = True
    scales: str = "both"
    residual: bool = True
    form: str = "rescale"
    sites: str | tuple[str, ...] = SITES
    blocks: str | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        """Normalise ``sites`` / ``blocks`` (so equal choices compare equal) and refuse impossible mixes."""
        for key, allowed in (("init", INITS), ("scales", SCALES), ("form", FORMS), ("qkv", ("auto", "split", "fused"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"RLRR {key} must be one of {', '.join(allowed)}, not {getattr(self, key)!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, not {self.rank}")
        parts = self.sites.split(",") if isinstance(self.sites, str) else self.sites
        parts = {p.strip() for p in parts if p.strip()}
        if not parts or parts - set(SITES):
            raise ValueError(f"sites must be one or more of {', '.join(SITES)}, not {self.sites!r}")
        self.sites = tuple(p for p in SITES if p in parts)
        if isinstance(self.blocks, str):
            which, _, k = self.blocks.partition(":")
            if which not in ("first", "last") or not k.strip().isdigit() or int(k) < 1:
                raise ValueError(f"blocks must be 'first:K', 'last:K' (K ≥ 1) or a list of block indices, not "
                                 f"{self.blocks!r}")
            self.blocks = f"{which}:{int(k)}"
        elif self.blocks is not None:
            if not self.blocks:
                raise ValueError("blocks=[] adapts nothing; name at least one block, or leave blocks unset for all")
            self.blocks = tuple(self.blocks)
        if self.form == "additive" and (not self.residual or self.scales != "both"):
            raise ValueError("form='additive' is W + s_l s_rᵀ: it has no residual switch and needs both vectors; "
                             "drop residual=False / scales=...")
        if self.init == "identity" and not self.residual:
            raise ValueError("init='identity' zeroes S, which without the residual gives W' = 0; use init='constant' "
                             "(all ones: W' = W at step 0) with residual=False")

    def variant(self) -> dict:
        """The keyword arguments that tell the rescaled layers how to build W'."""
        return {"scales": self.scales, "residual": self.residual, "form": self.form}


# The official RLRR code's Swin (models/swin.py) differs from its ViT in three places: one s_r shared over
# the fused qkv (everywhere else q, k, v are three maps), the patch-merging reduction rescaled, and no
# SSF after the patch embedding.  RLRR follows it on these timm classes (Swin V2 as V1's layout).
OFFICIAL_SWIN = ("SwinTransformer", "SwinTransformerV2")


def apply_rlrr(model: nn.Module, cfg: RLRRConfig) -> nn.Module:
    swin = type(model).__name__ in OFFICIAL_SWIN
    weights, norms, found = resolve(model, cfg.targets, cfg.norms, swin if cfg.reduction is None else cfg.reduction)
    if swin and found is not None and cfg.norms is None:  # the official Swin puts no SSF after its patch embedding
        norms = [(n, m) for n, m in norms if n != found.stem]
    weights, norms = select(model, weights, norms, cfg.sites, cfg.blocks)
    qkv = cfg.qkv if cfg.qkv != "auto" else ("fused" if swin else "split")
    freeze(model, cfg.train_head)
    for name, module in weights:
        if isinstance(module, nn.Linear):
            fused = name.rsplit(".", 1)[-1] == "qkv" and module.out_features % 3 == 0
            replace(model, name, RescaledLinear(module, 3 if fused and qkv == "split" else 1, cfg.rank, cfg.init,
                                                **cfg.variant()))
        elif isinstance(module, nn.Conv2d):
            replace(model, name, RescaledConv2d(module, cfg.rank, cfg.init, **cfg.variant()))
        else:
            raise TypeError(f"RLRR target {name} is a {type(module).__name__}; only Linear and Conv2d can be rescaled")
    if cfg.norm_rescale:
        inject_feature_rescale(model, norms, 0.0 if cfg.init == "identity" else 0.02)
    return model


def merge_rlrr(model: nn.Module) -> nn.Module:
    return merge_feature_rescale(merge_modules(model, _Rescaled))


register(Method("rlrr", RLRRConfig, apply_rlrr, merge_rlrr))
