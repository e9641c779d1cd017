"""``rlrr serve``: many task adapters on one backbone behind HTTP."""
from __future__ import annotations

from pathlib import Path

from .common import add_model_args, at_least, backbone, data_config


def cmd_serve(args) -> None:
    try:
        from ..serve import Service, serve  # FastAPI and uvicorn: the [serve] extra
    except ImportError:
        raise RuntimeError("rlrr serve needs the serve extra; pip install 'rlrr[serve]'") from None
    from ..bank import AdapterBank
    from ..data.transforms import eval_transform
    folder = Path(args.adapters) if args.adapters else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"--adapters {folder} is not a folder; name the folder holding the *.safetensors adapters")
    pinned = {}
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise ValueError(f"--adapter {spec!r} must be NAME=PATH with an existing adapter file")
        pinned[name] = Path(path)
    model = backbone(args, None)
    service = Service(AdapterBank(model, mode=args.mode), eval_transform(data_config(model), "none"), folder, pinned,
                      args.max_batch, args.max_wait_ms)
    serve(service, args.host, args.port)


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="HTTP classification service over many task adapters on one backbone")
    add_model_args(p, adapter=False)
    p.add_argument("--adapters", help="folder of *.safetensors adapters, each a task named by its file stem "
                                      "(rescanned: drop a file in or remove it, no restart)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="one more task (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=at_least(1), default=8000)
    p.add_argument("--max-batch", type=at_least(1), default=32, help="images per bank call at most")
    p.add_argument("--max-wait-ms", type=at_least(0.0, float), default=10.0,
                   help="how long the first queued image waits for others to share its batch")
    p.add_argument("--mode", choices=["auto", "shared", "grouped"], default="auto",
                   help="how adapted layers run a mixed batch (see rlrr.bank)")
    p.set_defaults(func=cmd_serve)

