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


def card_text(result: dict) -> str:
    """The card of a finished run from its summary (``summary.json``'s dict)."""
    settings = result.get("settings", {})
    model, method = settings.get("model", "?"), result["method"]
    metrics = [{"type": "accuracy", "value": round(result["test_acc"], 2), "name": "test top-1 (%)"}] \
        if result.get("test_acc") is not None else \
        [{"type": "accuracy", "value": round(result["val_acc"], 2), "name": "val top-1 (%), not tested"}]
    meta = {"library_name": "rlrr", **({"base_model": base} if (base := base_model_id(model)) else {}),
            "tags": ["rlrr", "peft", "image-classification", method], "pipeline_tag": "image-classification",
            "model-index": [{"name": f"{method} on {result['dataset']}", "results": [{
                "task": {"type": "image-classification"},
                "dataset": {"name": result["dataset"], "type": settings.get("data", result["dataset"])},
                "metrics": metrics}]}],
            "rlrr": {"method": method, "method_options": result.get("method_config", {}),
                     "data": settings.get("data"), "num_classes": result["num_classes"],
                     "protocol": result["protocol"], "selection": result["selection"],
                     "selected_epoch": result["selected_epoch"], "method_params": result["method_params"],
                     "trainable_params": result["trainable_params"],
                     "backbone_fingerprint": settings.get("backbone_fingerprint")}}
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
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def write_card(path: str | Path, result: dict) -> Path:
    text = card_text(result)
    return atomic_write(path, lambda f: f.write(text), "w")
