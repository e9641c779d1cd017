"""A model card beside every trained adapter: the ``README.md`` with YAML front matter that the Hugging Face
Hub reads (``huggingface_hub.ModelCard``), so a run folder says what it holds wherever it is uploaded.

The front matter carries the Hub's keys (library, base model, tags, pipeline, ``model-index`` with the
test top-1) and an ``rlrr`` section with what the Hub has no key for: the method and its options, the
data, the protocol, parameter counts and the backbone fingerprint the adapter checks on load.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .files import atomic_write


def base_model_id(model: str) -> str | None:
    """The Hub id of the backbone: an ``hf:`` hub id as given, a timm name under ``timm/``; None for a local
    folder (no Hub id to point at)."""
    if model.startswith("hf:"):
        source = model.removeprefix("hf:")
        return None if Path(source).exists() else source
    return f"timm/{model}"


def front_matter(model: str, method: str, dataset: str, data: str | None, metrics: list[dict], tags: list[str],
                 details: dict) -> dict:
    """The Hub's keys (library, base model, tags, pipeline, ``model-index`` when there is a metric) and an
    ``rlrr`` section (``details``) with what the Hub has no key for."""
    index = [{"name": f"{method} on {dataset}", "results": [{
        "task": {"type": "image-classification"}, "dataset": {"name": dataset, "type": data or dataset},
        "metrics": metrics}]}] if metrics else []
    return {"library_name": "rlrr", **({"base_model": base} if (base := base_model_id(model)) else {}),
            "tags": ["rlrr", "peft", "image-classification", method, *tags], "pipeline_tag": "image-classification",
            **({"model-index": index} if index else {}), "rlrr": details}


def card(meta: dict, body: str) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def card_text(result: dict) -> str:
    """The card of a finished run from its summary (``summary.json``'s dict)."""
    settings = result.get("settings", {})
    model, method = settings.get("model", "?"), result["method"]
    metrics = [{"type": "accuracy", "value": round(result["test_acc"], 2), "name": "test top-1 (%)"}] \
        if result.get("test_acc") is not None else \
        [{"type": "accuracy", "value": round(result["val_acc"], 2), "name": "val top-1 (%), not tested"}]
    meta = front_matter(model, method, result["dataset"], settings.get("data"), metrics, [], {
        "method": method, "method_options": result.get("method_config", {}), "data": settings.get("data"),
        "num_classes": result["num_classes"], "protocol": result["protocol"], "selection": result["selection"],
        "selected_epoch": result["selected_epoch"], "method_params": result["method_params"],
        "trainable_params": result["trainable_params"], "backbone_fingerprint": settings.get("backbone_fingerprint")})
    score = metrics[0]
    body = f"""# {method} adapter for {model} on {result['dataset']}

Trained with [rlrr](https://pypi.org/project/rlrr/): {method} on the frozen backbone `{model}`,
{result['trainable_params']:,} trainable parameters ({result['method_params']:,} of the method, the rest the
{result['num_classes']}-class head). {score['name']}: **{score['value']}** (protocol `{result['protocol']}`:
{result['selection']}).

| | |
|---|---|
| files | `adapter.safetensors` (the last epoch), `best_adapter.safetensors` (the best on val) |
| data | `{settings.get('data')}` |
| method options | `{result.get('method_config', {})}` |
| backbone fingerprint | `{settings.get('backbone_fingerprint')}` (checked when the adapter is loaded) |

```python
import rlrr
model = rlrr.create_backbone("{model}", weights=..., num_classes={result['num_classes']})  # the weights it was trained on
model = rlrr.load_adapter(model, "adapter.safetensors")  # rlrr.merge(model) folds it into plain weights
```
"""
    return card(meta, body)


def merged_card_text(model: str, weights_file: str, adapter_meta: dict, num_classes: int, params: int,
                     run: dict | None) -> str:
    """The card of a merged model (``rlrr merge``): plain weights of ``model`` with the adapter folded in, what
    the adapter was (its metadata) and, when its run's summary is beside it, the run's data and test top-1."""
    import json
    method = adapter_meta.get("method", "?")
    settings = (run or {}).get("settings", {})
    data = settings.get("data")
    dataset = (run or {}).get("dataset") or (data or "its task")
    metrics = [{"type": "accuracy", "value": round(run["test_acc"], 2), "name": "test top-1 (%)"}] \
        if run and run.get("test_acc") is not None else []
    options = json.loads(adapter_meta.get("config", "{}"))
    meta = front_matter(model, method, dataset, data, metrics, ["merged"], {
        "method": method, "method_options": options, "data": data, "num_classes": num_classes, "merged": True,
        "params": params, "adapter_backbone_fingerprint": adapter_meta.get("backbone_fingerprint"),
        **({"protocol": run["protocol"]} if run else {})})
    load = (f'model = transformers.AutoModelForImageClassification.from_pretrained("{weights_file}")'
            if model.startswith("hf:") else
            f'model = timm.create_model("{model}", pretrained=False, num_classes={num_classes})\n'
            f'model.load_state_dict(safetensors.torch.load_file("{weights_file}"))')
    body = f"""# {model} with a merged {method} adapter{f' for {dataset}' if run else ''}

Plain `{model}` weights ({params:,} parameters) with a {method} adapter trained by
[rlrr](https://pypi.org/project/rlrr/) folded in: the untouched architecture, no rlrr needed to run it,
no inference overhead.{f" {metrics[0]['name']}: **{metrics[0]['value']}** (protocol `{run['protocol']}`)." if metrics else ""}

| | |
|---|---|
| file | `{weights_file}` |
| method options | `{options}` |
| classes | {num_classes} |

```python
{load}
```
"""
    return card(meta, body)


def write_card(path: str | Path, result: dict) -> Path:
    text = card_text(result)
    return atomic_write(path, lambda f: f.write(text), "w")
