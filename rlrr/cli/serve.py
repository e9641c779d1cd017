"""``rlrr serve``: many task adapters on one backbone behind HTTP."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import add_compile_arg, add_model_args, at_least, backbone, data_config

TOKEN_ENV = "RLRR_SERVE_TOKEN"


def cmd_serve(args) -> None:
    from ..extras import need
    need("serve", "rlrr serve", "fastapi", "uvicorn", "multipart", "prometheus_client")
    from ..serving.http import Service, serve
    from ..serving.bank import AdapterBank
    from ..data.transforms import eval_transform
    folder = Path(args.adapters) if args.adapters else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"--adapters {folder} is not a folder; name the folder holding the *.safetensors adapters")
    pinned = {}
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise ValueError(f"--adapter {spec!r} must be NAME=PATH with an existing adapter file")
        if name in pinned:
            raise ValueError(f"--adapter {name}= is given twice ({pinned[name]} and {path}); give each task one name")
        pinned[name] = Path(path)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not token and not args.insecure and not loopback(args.host):
        raise ValueError(f"--host {args.host} can be reached from other machines, and anyone could then change the "
                         f"task set: set a token (--token or {TOKEN_ENV}), or pass --insecure to serve without one")
    if args.protect_inference and not token:
        raise ValueError(f"--protect-inference needs a token; set --token or {TOKEN_ENV}")
    model = backbone(args, None)
    bank = AdapterBank(model, mode=args.mode, compile=args.compile or "none")
    service = Service(bank, eval_transform(data_config(model), "none"), folder, pinned, args.max_batch, args.max_wait_ms,
                      max_queue=args.max_queue, timeout_s=args.timeout_s, token=token, protect_inference=args.protect_inference)
    serve(service, args.host, args.port)


def loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress
    import socket
    try:
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, not {text!r}")
    return int(text)


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="HTTP classification service over many task adapters on one backbone")
    add_model_args(p, adapter=False)
    p.add_argument("--adapters", help="folder of *.safetensors adapters, each a task named by its file stem "
                                      "(rescanned: drop a file in or remove it, no restart)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="one more task (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--max-batch", type=at_least(1), default=32, help="images per bank call at most")
    p.add_argument("--max-wait-ms", type=at_least(0.0, float), default=10.0,
                   help="how long the first queued image waits for others to share its batch")
    p.add_argument("--max-queue", type=at_least(1), default=64,
                   help="images waiting at most; past it a request is answered 503 with Retry-After")
    p.add_argument("--timeout-s", type=at_least(0.001, float), default=30.0,
                   help="a request not answered within this many seconds is answered 503")
    p.add_argument("--token", help=f"Bearer token for management routes (rescan); better: the {TOKEN_ENV} "
                                   "environment variable (a flag shows in the process list)")
    p.add_argument("--protect-inference", action="store_true", help="classify and the task list need the token too")
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback --host without a token (anyone who reaches it can change the tasks)")
    p.add_argument("--mode", choices=["auto", "shared", "grouped"], default="auto",
                   help="how adapted layers run a mixed batch (see rlrr.serving.bank)")
    add_compile_arg(p, "the bank: every batch in the shared form, one graph for any task mix and batch size "
                       "(--mode is then unused; RLRR on convolutions is refused)")
    p.set_defaults(func=cmd_serve)

