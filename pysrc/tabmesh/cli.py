"""The `tabmesh` command (host side): setup, serve, and the tools built on the page engine."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def repo_root() -> Path:
    """The checkout holding web/, wgsl/ and vendor/ (the package is installed editable from it)."""
    env = os.environ.get("TABMESH_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "web" / "index.html").exists() and (parent / "wgsl").is_dir():
            return parent
    cwd = Path.cwd().resolve()
    for parent in (cwd, *cwd.parents):
        if (parent / "web" / "index.html").exists():
            return parent
    raise SystemExit("tabmesh: cannot find the app files (web/, wgsl/); run from the checkout or set TABMESH_ROOT")


def cmd_setup(args) -> int:
    from . import setup_assets
    argv = ["--root", str(repo_root())]
    if args.check:
        argv.append("--check")
    return setup_assets.main(argv)


def cmd_serve(args) -> int:
    from signaling.server import ServerConfig, serve
    root = repo_root()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"tabmesh: listening on {args.host}: anyone who can reach it can join rooms", file=sys.stderr)
    config = ServerConfig(host=args.host, port=args.port, root=root,
                          models_dir=Path(args.models).resolve() if args.models else root / "models",
                          heartbeat_interval_s=args.heartbeat_interval, heartbeat_timeout_s=args.heartbeat_timeout)
    serve(config)
    return 0


def cmd_bench(args) -> int:
    from . import bench
    return bench.main(args.rest, root=repo_root())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tabmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", help="vendor Pyodide, PyScript, numpy and the default models (idempotent)")
    p.add_argument("--check", action="store_true", help="only verify what is there; download nothing")
    p.set_defaults(fn=cmd_setup)

    p = sub.add_parser("serve", help="serve the page, signaling and the model files")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models", help="a folder of GGUF files to serve (default: the models setup fetched)")
    p.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds between client heartbeats")
    p.add_argument("--heartbeat-timeout", type=float, default=6.0, help="drop a peer silent this long (s)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("bench", help="measure in headless Chromium against references; prints a table",
                       add_help=False)
    p.set_defaults(fn=cmd_bench)

    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
