"""Many tasks on one frozen backbone: a bank of adapters, served per sample in mixed-task batches.

Every adapter the bank serves (RLRR at any rank, split or fused qkv, with its SSF rescales; SSF;
BitFit; LoRA; a linear probe) changes the backbone only at a few *sites*, by per-channel vectors and
low-rank factors.  The bank keeps the backbone once and, at each site, stacks every task's tensors
along a task axis, gathered per row of the batch at forward time:

* a Linear / Conv2d site:  ``y = (x W'_tᵀ + b_t)·γ_t + β_t``,  ``W'_t = W + (Σ s_l s_rᵀ)_t ⊙ W + (B A)_t``
  (RLRR's rescale and bias shift, LoRA's update, BitFit's bias, SSF's output rescale);
* a norm site:             ``y = norm₀(x)·w_t + b_t``  (``norm₀`` without its affine: SSF and BitFit folded).

The bank sorts a batch by task, so each task's samples are one slice of it (a layer's rows map to
samples in blocks: a ViT's (B, N, C) has one row per sample, Swin's windowed (B·nW, N, C) has nW
consecutive rows per sample), and runs it in one of three forms:

* *per task* (``mode="auto"`` when the tasks hold ``GROUPED_SAMPLES`` samples each on average, and any
  batch of one task): each task's slice through the network on its own, every layer with that task's
  ``W'_t`` formed for the call — one GEMM's work in all plus a pass over W per task, like swapping
  adapters, without the copies; a whole batch of one task keeps its W' for the next (``keep_last``);
* *grouped* (``"auto"`` otherwise, at layers where the tasks hold ``GROUPED_ROWS`` rows each on
  average; or ``mode="grouped"``): one forward, each layer one GEMM per task slice with its ``W'_t``;
* *shared* (``"auto"`` at layers with fewer rows per task; or ``mode="shared"``): one GEMM with W for
  every row, one more on the rows pre-scaled by ``s_r[t]`` (then ``⊙ s_l[t]``) for RLRR, LoRA's rank-r
  products per row — two GEMMs however many tasks the batch mixes.

Norms run once per task slice with their affine folded in (up to ``SPAN_NORMS`` tasks), else once with
per-row affines.  A conv's RLRR rescale is not per channel, so a conv site with one runs per task
slice in every form.  Methods that change whole weights (full fine-tuning) or add computation (VPT,
AdaptFormer, HTA, APLA) are refused in one line, as are peft tuners; the thresholds between the forms
come from ``benchmarks/bank.py``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Adapter, AdapterMismatchError, class_names, load_adapter
from ..backbones import architecture, checkpoint_num_classes, fingerprint, set_num_classes
from ..backbones.discover import affine_of, channel_dim, classifier_modules, input_only_via_affine, is_weight_layer
from ..methods.base import NotServable, replace

SERVABLE = ("rlrr", "ssf", "bitfit", "linear", "lora")
GROUPED_SAMPLES = 8  # samples per task (on average) from which "auto" runs each task's slice on its own
GROUPED_ROWS = 64  # GEMM rows per task (on average) from which "auto" runs a layer once per task slice
SPAN_NORMS = 16  # up to this many tasks in a batch, a norm runs once per task with its affine folded in


@dataclass
class Rows:
    """The batch being served, its samples sorted by task (set by the bank around a forward):
    ``segments`` are ``(task slot, first sample, samples)``, so each task's rows are one slice."""
    segments: list[tuple[int, int, int]] | None = None
    whole: bool = False  # the segments are the whole batch (not one task's slice run on its own)
    ids: torch.Tensor | None = None  # the traced form: each sample's task slot, unsorted; every layer per row

    def spans(self, x: torch.Tensor) -> list[tuple[int, int, int]]:
        """``(task slot, first row, end row)`` of a layer's input: samples in consecutive blocks of rows."""
        n = sum(c for _, _, c in self.segments)
        if x.shape[0] % n:
            raise ValueError(f"a layer's input has {x.shape[0]} rows for {n} samples: it does not carry the batch "
                             "(a constant table), so this model cannot be served per sample")
        k = x.shape[0] // n
        return [(t, k * a, k * (a + c)) for t, a, c in self.segments]

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """The task slot of each row of a layer's input (for the per-row forms)."""
        if self.ids is not None:  # tensor ops only: no Python decision on the batch's task mix
            return self.ids.repeat_interleave(x.shape[0] // self.ids.shape[0])
        spans = self.spans(x)
        return torch.cat([torch.full((b - a,), t, device=x.device) for t, a, b in spans])


def per_row(v: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-row vectors ``v`` (L, C) viewed to broadcast over ``x`` with channels at ``dim``."""
    shape = [v.shape[0]] + [1] * (x.ndim - 1)
    shape[dim] = v.shape[-1]
    return v.view(shape)


class Site(nn.Module):
    """A frozen backbone layer with every task's tensors for it, stacked by task slot (``stack[kind]``
    is ``(tasks, ...)``).  A task without a kind gets the kind's identity (zero update, unit scale,
    the base bias); ranks differ between tasks, so rank axes are zero-padded to the largest."""

    PAD: dict[str, int] = {}  # kind -> axis of one task's tensor that is a rank (zero-padded)

    def __init__(self, base: nn.Module, rows: Rows):
        super().__init__()
        self.base, self.rows = base.requires_grad_(False), rows
        self.stack: dict[str, torch.Tensor] = {}
        self.tasks = 0

    def identity(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Append one task's row; ``values`` holds the kinds this task sets."""
        values = {k: v.detach() for k, v in values.items()}
        for kind in set(self.stack) | set(values):
            have = self.stack.get(kind)
            if have is None:  # a kind no earlier task had: identities for them first
                like = values[kind]
                have = torch.stack([self.identity(kind, like)] * self.tasks) if self.tasks else like[None][:0]
            row = values[kind] if kind in values else self.identity(kind, have.new_zeros(have.shape[1:]))
            axis = self.PAD.get(kind)
            if axis is not None and row.shape[axis] != have.shape[axis + 1]:
                size = max(row.shape[axis], have.shape[axis + 1])
                row, have = _pad(row, axis, size), _pad(have, axis + 1, size)
            self.stack[kind] = torch.cat([have, row.to(have)[None]])
        self.tasks += 1

    def remove(self, slot: int) -> None:
        keep = [i for i in range(self.tasks) if i != slot]
        self.stack = {k: v[keep] for k, v in self.stack.items()}
        self.tasks -= 1

    def affine_out(self, y: torch.Tensor, tr: torch.Tensor, dim: int) -> torch.Tensor:
        """``y·γ[t] + bias[t]`` per row, for the kinds present."""
        if "gamma" in self.stack:
            y = y * per_row(self.stack["gamma"][tr], y, dim)
        if "bias" in self.stack:
            y = y + per_row(self.stack["bias"][tr], y, dim)
        return y

    def per_span(self, x: torch.Tensor, spans: list[tuple[int, int, int]], run) -> torch.Tensor:
        """``run(rows of x, task slot)`` for each task's slice of rows, joined (one slice: no copy)."""
        parts = [run(x[a:b], t) for t, a, b in spans]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _pad(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    pad = [0, 0] * (t.ndim - axis - 1) + [0, size - t.shape[axis]]
    return F.pad(t, pad)


class WeightSite(Site):
    """A Linear or Conv2d: shared or grouped form (module docstring); ``rescaler`` is a task's RLRR layer,
    kept for its geometry (groups, the conv's matrix view) so W'_t is formed by RLRR's own code."""

    PAD = {"scale_l": 0, "scale_r": 0, "lora_A": 0, "lora_B": 1}

    def __init__(self, base: nn.Module, rows: Rows, mode: str, keep_last: bool):
        super().__init__(base, rows)
        self.mode, self.rescaler, self.keep_last = mode, None, keep_last
        self.last: tuple[int, torch.Tensor] | None = None  # (slot, W') of the last one-task batch
        self.dim = 1 if isinstance(base, nn.Conv2d) else -1

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self.last = None  # slots after it moved

    def identity(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        if kind == "gamma":
            return torch.ones_like(like)
        if kind == "bias" and self.base.bias is not None:
            return self.base.bias.detach()
        return torch.zeros_like(like)

    def task_weight(self, t: int) -> torch.Tensor:
        """W'_t of one task, for one GEMM/conv: formed by RLRR's own code into its reused workspace."""
        s, w = self.stack, self.base.weight
        if "scale_l" in s:
            w = self.rescaler.weight_for(s["scale_l"][t], s["scale_r"][t], w)
        if "lora_A" in s:
            w = w + s["lora_B"][t] @ s["lora_A"][t]
        return w

    def task_forward(self, x: torch.Tensor, t: int, w: torch.Tensor | None = None) -> torch.Tensor:
        """One task's rows through its own layer: ``(x W'_tᵀ)·γ_t + bias_t``, the bias inside the GEMM."""
        w = self.task_weight(t) if w is None else w
        bias = self.stack["bias"][t] if "bias" in self.stack else self.base.bias
        if "gamma" not in self.stack:
            return self.op(x, w, bias)
        y = self.op(x, w, None) * per_row(self.stack["gamma"][t][None], x, self.dim)
        return y if bias is None else y + per_row(bias[None], y, self.dim)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """As ``Site.add`` (a new task's rows never move the others: the kept W' stays valid, unless a rank
        axis grew); an RLRR task whose qkv shares one ``s_r`` (fused, 1 group) beside tasks with q, k,
        v split (3 groups) is the same rescale written in 3 groups: s_l cut in 3, s_r repeated."""
        groups = self.stack["scale_l"].shape[2] if "scale_l" in self.stack else None
        if "scale_l" in values and groups is not None and values["scale_l"].shape[1] != groups:
            if groups == 1:  # the new task splits: regroup every earlier row instead
                self.stack = {**self.stack, **regrouped(self.stack["scale_l"], self.stack["scale_r"],
                                                        values["scale_l"].shape[1], axis=1)}
            else:
                values = {**values, **regrouped(values["scale_l"], values["scale_r"], groups, axis=0)}
        super().add(values)
        self.last = None

    def op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return self.base._conv_forward(x, w, b) if isinstance(self.base, nn.Conv2d) else F.linear(x, w, b)

    def grouped(self, x: torch.Tensor, spans: list[tuple[int, int, int]]) -> bool:
        """One GEMM per task slice: forced by ``mode``, always for a conv's RLRR rescale, and in "auto" when
        the tasks hold ``GROUPED_ROWS`` GEMM rows (tokens) each on average: forming a task's W' costs about
        what a GEMM of that many rows does, while the shared form costs a second GEMM on every row."""
        if self.dim == 1 and "scale_l" in self.stack:
            return True
        if self.mode != "auto":
            return self.mode == "grouped"
        tokens = x[0].numel() // x.shape[self.dim]  # GEMM rows per leading row
        return x.shape[0] * tokens >= GROUPED_ROWS * len(spans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows.ids is not None:
            return self.shared(x, self.rows.of(x))
        spans = self.rows.spans(x)
        if len(spans) == 1:  # one task's rows: its own layer; a whole batch of one task keeps its W'
            t = spans[0][0]
            if not (self.keep_last and self.rows.whole):
                return self.task_forward(x, t)
            if self.last is None or self.last[0] != t:
                self.last = (t, self.task_weight(t).clone())
            return self.task_forward(x, t, self.last[1])
        if self.grouped(x, spans):
            return self.per_span(x, spans, self.task_forward)
        return self.shared(x, self.rows.of(x))

    def shared(self, x: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
        """Every row at once, ``tr`` its task slots: W for all, the tasks' updates gathered per row."""
        y = self.op(x, self.base.weight)
        s = self.stack
        if "scale_l" in s:  # += s_l[t] ⊙ ((x ⊙ s_r[t]) W_gᵀ) in place, per rank k and row block g of W
            rank, groups, rows = s["scale_l"].shape[1:]
            w = self.base.weight.view(groups, rows, -1)
            for k in range(rank):
                for g in range(groups):
                    z = F.linear(x * per_row(s["scale_r"][tr, k, g], x, -1), w[g])
                    y[..., g * rows:(g + 1) * rows].addcmul_(z, per_row(s["scale_l"][tr, k, g], x, -1))
        if "lora_A" in s:  # (x A[t]ᵀ) B[t]ᵀ per row
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            h = torch.bmm(flat, s["lora_A"][tr].transpose(1, 2))
            y = y + torch.bmm(h, s["lora_B"][tr].transpose(1, 2)).view(y.shape)
        return self.affine_out(y, tr, self.dim)


def regrouped(scale_l: torch.Tensor, scale_r: torch.Tensor, groups: int, axis: int) -> dict[str, torch.Tensor]:
    """One-group RLRR factors (rank, 1, rows·groups), (rank, 1, cols) as ``groups`` row blocks sharing s_r;
    ``axis`` is the rank axis (0 for one task's tensors, 1 for a stack)."""
    lead = scale_l.shape[:axis + 1]
    return {"scale_l": scale_l.reshape(*lead, groups, -1),
            "scale_r": scale_r.expand(*lead, groups, scale_r.shape[-1]).contiguous()}


class NormSite(Site):
    """A norm: its output without the affine, then each row's task affine (``w_t``, ``b_t``)."""

    def __init__(self, base: nn.Module, rows: Rows):
        super().__init__(base, rows)
        self.names, self.dim = affine_of(base), channel_dim(base)

    def identity(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        name = self.names[0] if kind == "gamma" else self.names[1]
        own = getattr(self.base, name) if name else None
        return own.detach().reshape(-1) if own is not None else torch.zeros_like(like)

    def task_forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """One task's rows through the norm with its affine folded in: exactly the merged model's norm."""
        n = self.base
        own = {name: self.stack[k][t].view_as(getattr(n, name)) if k in self.stack else getattr(n, name)
               for k, name in zip(("gamma", "bias"), self.names) if name}
        return torch.func.functional_call(n, own, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows.ids is not None:
            return self.shared(x, self.rows.of(x))
        spans = self.rows.spans(x)
        if len(spans) <= SPAN_NORMS:
            return self.per_span(x, spans, self.task_forward)
        return self.shared(x, self.rows.of(x))

    def shared(self, x: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
        """Every row at once, ``tr`` its task slots: the norm without its affine, then each row's affine."""
        n = self.base
        plain = {name: torch.ones_like(getattr(n, name)) if k == "gamma" else torch.zeros_like(getattr(n, name))
                 for k, name in zip(("gamma", "bias"), self.names) if name}
        return self.affine_out(torch.func.functional_call(n, plain, (x,)), tr, self.dim)


@dataclass
class Task:
    """What the bank holds for one task besides its site rows: its head and its class names."""
    head: nn.Module
    class_names: list[str]


class AdapterBank(nn.Module):
    """A frozen timm backbone serving many tasks' adapters at once (see the module docstring).

    ``bank(images, tasks)`` -> one logit tensor per image from its own task's head;
    ``add(name, path)`` / ``remove(name)`` at any time; ``mode``: "auto", "shared" or "grouped" (module
    docstring);
    ``keep_last``: keep the W' of the last batch that held one task, so that consecutive batches of one
    task cost what the plain backbone costs (memory: one copy of the adapted weights);
    ``compile``: a torch.compile backend ("none": eager).  The eager forms are chosen per batch in Python
    from its task mix, which a compiled graph would be guarded on and rebuilt for at every new mix; compiled,
    the bank runs every batch in the shared form with each sample's task slot as a tensor (``Rows.ids``),
    so one graph serves any mix and batch size (rebuilt as the task set first grows, not per batch).  Conv sites with
    an RLRR rescale (not per channel) have no per-row form and are refused when compiled.
    """

    def __init__(self, backbone: nn.Module, adapters: dict[str, str | Path] | None = None, mode: str = "auto",
                 keep_last: bool = True, compile: str = "none"):
        super().__init__()
        if mode not in ("auto", "shared", "grouped"):
            raise ValueError(f"mode must be 'auto', 'shared' or 'grouped', not {mode!r}")
        if not hasattr(backbone, "forward_head") or len(classifier_modules(backbone)) != 1:
            raise ValueError(f"the bank serves timm backbones with one classifier head; {architecture(backbone)} "
                             "is not one")
        self.model, self.mode, self.keep_last, self.rows = backbone.eval().requires_grad_(False), mode, keep_last, Rows()
        self.fingerprint = fingerprint(backbone)
        self.traced = None
        if compile != "none":
            from ..engine.compile import check_backend
            check_backend(compile)
            self.traced = torch.compile(self.pre_logits, backend=compile)
        self.tasks: dict[str, Task] = {}
        for name, path in (adapters or {}).items():
            self.add(name, path)

    # --- adding and removing tasks -----------------------------------------------------------------
    def plain(self) -> nn.Module:
        """A copy of the backbone without the bank's sites (what an adapter is loaded onto)."""
        model = copy.deepcopy(self.model)
        for name, m in list(model.named_modules()):
            if isinstance(m, Site):
                replace(model, name, m.base)
        return model

    def add(self, name: str, path: str | Path, check_fingerprint: bool = True) -> Task:
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already in the bank; remove it first")
        adapter = Adapter.read(path)
        tensors, meta = adapter.tensors, adapter.meta
        method = meta["method"].removesuffix("+pace")  # PACE only regularises training
        if method not in SERVABLE:
            raise AdapterMismatchError(f"{path}: {meta['method']} adapters cannot be served per sample (the bank "
                                       f"serves {', '.join(SERVABLE)}: per-channel vectors and low-rank updates)")
        plain = self.plain()
        set_num_classes(plain, checkpoint_num_classes(architecture(plain), tensors) or 1)  # the task's own head
        plain.backbone_fingerprint = self.fingerprint  # the head does not count: no need to hash it again
        try:
            adapted = load_adapter(plain, adapter, check_fingerprint=check_fingerprint).eval()
        except AdapterMismatchError as e:
            raise AdapterMismatchError(f"{e} (bank backbone {architecture(self.model)})") from None
        frozen = {n: m.base if isinstance(m, Site) else m for n, m in self.model.named_modules()}
        with torch.no_grad():
            sites, head = task_sites(adapted, frozen)
        convs = [n for n, (_, values, _) in sites.items() if "scale_l" in values and isinstance(frozen[n], nn.Conv2d)]
        if self.traced is not None and convs:
            raise AdapterMismatchError(f"{path}: its RLRR rescales convolutions ({convs[0]}), which a compiled bank "
                                       "cannot run per sample; serve it without --compile")
        for site_name, (kind, values, rescaler) in sites.items():
            site = self.site(site_name, kind)
            if rescaler is not None and (site.rescaler is None or rescaler.scale_l.shape[1] > site.rescaler.scale_l.shape[1]):
                rescaler.weight, rescaler.bias = site.base.weight, site.base.bias  # not the loaded copy's
                site.rescaler = rescaler  # its geometry forms W'_t: the one with the most qkv groups
        for site_name, site in self.sites().items():
            site.add(sites.get(site_name, (None, {}, None))[1])
        task = Task(head, class_names(meta, head.out_features))
        self.tasks[name] = task
        return task

    def remove(self, name: str) -> None:
        if name not in self.tasks:
            raise KeyError(f"no task {name!r} in the bank; tasks: {', '.join(self.tasks) or 'none'}")
        slot = list(self.tasks).index(name)
        for site in self.sites().values():
            site.remove(slot)
        del self.tasks[name]

    def sites(self) -> dict[str, Site]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, Site)}

    def site(self, name: str, kind: type) -> Site:
        """The site at ``name``, made on first use (earlier tasks get identity rows)."""
        have = self.model.get_submodule(name)
        if isinstance(have, Site):
            return have
        site = WeightSite(have, self.rows, self.mode, self.keep_last) if kind is WeightSite else NormSite(have, self.rows)
        if isinstance(site, NormSite) and not input_only_via_affine(have, _probe_shape(have)):
            raise AdapterMismatchError(f"{name} ({type(have).__name__}) adds its input past its affine; a task's "
                                       "change to it cannot be served per sample")
        for _ in self.tasks:
            site.add({})
        replace(self.model, name, site)
        return site

    # --- serving -----------------------------------------------------------------------------------
    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def features(self, x: torch.Tensor, segments: list[tuple[int, int, int]], whole: bool) -> torch.Tensor:
        """Pre-logit features of ``x`` whose samples are ``segments`` (task slot, first, count)."""
        self.rows.segments, self.rows.whole = segments, whole
        try:
            return self.pre_logits(x)
        finally:
            self.rows.segments = None

    def traced_features(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Pre-logit features of ``x`` through the compiled per-row graph, ``slots`` each sample's task (the
        batch comes sorted by task as for the eager forms, so the heads run on one slice per task)."""
        self.rows.ids = torch.tensor(slots, device=x.device)
        torch._dynamo.mark_dynamic(x, 0)  # any batch size, one graph
        torch._dynamo.mark_dynamic(self.rows.ids, 0)
        try:
            return self.traced(x)
        finally:
            self.rows.ids = None

    @torch.no_grad()
    def forward(self, images: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        if len(tasks) != len(images):
            raise ValueError(f"{len(images)} images but {len(tasks)} task names; give one task per image")
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise KeyError(f"no task {unknown[0]!r} in the bank; tasks: {', '.join(self.tasks) or 'none'}")
        if not tasks:  # an empty batch: nothing to answer (a layer could not tell rows per sample)
            return []
        names = list(self.tasks)
        slots = [names.index(t) for t in tasks]
        order = sorted(range(len(tasks)), key=slots.__getitem__)  # each task's samples one slice of the batch
        segments, start = [], 0
        for i in range(1, len(order) + 1):
            if i == len(order) or slots[order[i]] != slots[order[start]]:
                segments.append((slots[order[start]], start, i - start))
                start = i
        x = images if order == list(range(len(order))) else images[order]
        if self.traced is not None:
            feats = self.traced_features(x, [slots[i] for i in order])
        elif self.mode == "auto" and len(segments) > 1 and len(tasks) >= GROUPED_SAMPLES * len(segments):
            feats = torch.cat([self.features(x[a:a + c], [(t, 0, c)], False) for t, a, c in segments])
        else:
            feats = self.features(x, segments, True)
        out: list[torch.Tensor | None] = [None] * len(tasks)
        for t, a, c in segments:
            for j, logits in zip(order[a:a + c], self.tasks[names[t]].head(feats[a:a + c])):
                out[j] = logits
        return out


def task_sites(adapted: nn.Module, own: dict[str, nn.Module]) -> tuple[dict[str, tuple[type, dict, nn.Module | None]],
                                                                        nn.Module]:
    """Where an adapted model differs from the frozen backbone (``own``: its modules by name), as site
    rows: ``{name: (site kind, {kind: tensor}, RLRR layer or None)}``, and its head.  Anything else that
    differs (a whole weight) cannot be served per sample and is refused, naming it."""
    heads = classifier_modules(adapted)
    head_ids = {id(m) for h in heads for m in h.modules()}
    sites: dict[str, tuple[type, dict, nn.Module | None]] = {}
    done: list[str] = []
    for name, m in adapted.named_modules():
        if not name or id(m) in head_ids or any(name.startswith(d + ".") for d in done):
            continue
        if hasattr(m, "bank_rows"):  # a method's layer says what it stacks (RLRR, LoRA, SSF's rescale)
            try:
                kind, values = m.bank_rows()
            except NotServable as e:
                raise AdapterMismatchError(f"{name} is {e}") from None
            sites[name] = NormSite if kind == "norm" else WeightSite, values, m if "scale_l" in values else None
        else:  # a plain layer: a row only where a method changed its parameters in place (BitFit)
            changed = plain_changes(name, m, own[name]) if name in own else None
            if changed:
                sites[name] = changed
            continue
        done.append(name)  # a wrapper: its inner layers are part of its row
    return sites, copy.deepcopy(heads[0])


def plain_changes(name: str, m: nn.Module, base: nn.Module) -> tuple[type, dict, None] | None:
    """A plain layer's parameters that a method changed in place: biases (BitFit) and norm affines;
    None for anything else, or unchanged."""
    if is_weight_layer(m):
        if not torch.equal(m.weight, base.weight):
            raise AdapterMismatchError(f"the adapter changes the whole weight of {name}; only per-channel and "
                                       "low-rank changes can be served per sample (merge it and serve it alone)")
        same = m.bias is None or torch.equal(m.bias, base.bias)
        return None if same else (WeightSite, {"bias": m.bias}, None)
    if affine_of(m) is None:
        return None
    w_name, b_name = affine_of(m)
    if all(torch.equal(getattr(m, n), getattr(base, n)) for n in (w_name, b_name) if n):
        return None
    values = {"gamma": getattr(m, w_name).reshape(-1)}
    if b_name:
        values["bias"] = getattr(m, b_name).reshape(-1)
    return NormSite, values, None


def _probe_shape(m: nn.Module) -> tuple[int, ...]:
    c = getattr(m, affine_of(m)[0]).numel()
    return (2, c, 3, 3) if channel_dim(m) == 1 else (2, 3, c)
