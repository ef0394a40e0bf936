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
    from signaling.gateway import api_key_from_env, require_key_off_loopback
    from signaling.server import ServerConfig, serve
    root = repo_root()
    api_key = api_key_from_env(args.api_key)
    require_key_off_loopback(args.host, api_key)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"tabmesh: listening on {args.host}: anyone who can reach it can join rooms", file=sys.stderr)
    config = ServerConfig(host=args.host, port=args.port, root=root,
                          models_dir=Path(args.models).resolve() if args.models else root / "models",
                          heartbeat_interval_s=args.heartbeat_interval, heartbeat_timeout_s=args.heartbeat_timeout,
                          api_key=api_key, api_max_queue=args.max_queue)
    serve(config)
    return 0


def _model_location(model: str | None) -> tuple[Path | None, str | None]:
    """--model PATH → (folder to serve, file name); None → the default served models."""
    if model is None:
        return None, None
    path = Path(model).expanduser().resolve()
    if not path.is_file():
        raise SystemExit(f"tabmesh: model file not found: {path}")
    return path.parent, path.name


def cmd_generate(args) -> int:
    import json
    from .headless import HeadlessTab
    models_dir, name = _model_location(args.model)
    opts = {"prompt": args.prompt, "chat": args.chat, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": args.seed, "backend": args.backend, "model": name,
            "numerics": args.numerics}
    progress = (lambda msg: print(f"[generate] {msg}", file=sys.stderr, flush=True))
    with HeadlessTab(repo_root(), models_dir, progress=progress) as tab:
        if args.backend == "webgpu" and tab.info.get("gpu") is None:
            raise SystemExit("tabmesh: this Chromium offers no WebGPU adapter; use --backend numpy")
        progress(f"loading {name or 'the default model'} on {args.backend} and generating…")
        result = tab.page.evaluate("(opts) => tabmesh.llm.generate(opts)", opts)
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        t = result["timings"]
        print(f"[{len(result['prompt_tokens'])} prompt tokens, {len(result['tokens'])} generated; load {t['load_s']:.1f} s, "
              f"first token {t['ttft_s']:.2f} s, prefill {t['prefill_tok_s']:.1f} tok/s, decode {t['decode_tok_s']:.1f} tok/s]",
              file=sys.stderr)
    return 0


def cmd_tokenize(args) -> int:
    import json
    from .gguf import read_gguf_path
    from .tokenizer import Tokenizer
    tok = Tokenizer.from_gguf_metadata(read_gguf_path(args.model).metadata)
    ids = tok.encode(args.text, add_special=not args.no_special, parse_special=args.parse_special)
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    return 0


def cmd_node(args) -> int:
    import json
    import signal
    from signaling.gateway import api_key_from_env
    from .headless import run_node
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)
    return run_node(args.server, args.room, api_key=api_key_from_env(args.api_key), model=args.model,
                    backend=args.backend, serve_api=not args.no_api, headless=args.headless, emit=emit,
                    should_stop=lambda: bool(stop),
                    secret=args.secret or os.environ.get("TABMESH_ROOM_SECRET") or None)


def cmd_embed(args) -> int:
    from .cli_rag import cmd_embed as run
    return run(args, repo_root())


def cmd_rag_eval(args) -> int:
    from .cli_rag import cmd_rag_eval as run
    return run(args, repo_root())


def cmd_mesh_run(args) -> int:
    from .mesh_run import main as run
    return run(args, repo_root())


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
    p.add_argument("--api-key", help="key the OpenAI endpoint /v1/ requires (default: $TABMESH_API_KEY); "
                                     "required when --host is not a loopback address")
    p.add_argument("--max-queue", type=int, default=16, help="API requests waiting for a free tab before 429")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("generate", help="generate with the page's engine in headless Chromium")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="render the prompt as one user message of the chat template")
    p.add_argument("--model", help="a GGUF file (default: the first model setup fetched)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", choices=("webgpu", "numpy"), default="webgpu")
    p.add_argument("--numerics", choices=("ggml", "f32"),
                   help="ggml: llama.cpp's arithmetic bit for bit, its tokens (default on webgpu); "
                        "f32: float32 throughout, faster (the numpy backend's only mode in a tab)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("tokenize", help="token ids of TEXT with a GGUF's tokenizer")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-special", action="store_true", help="do not add BOS/EOS the vocabulary asks for")
    p.add_argument("--parse-special", action="store_true", help="recognise special tokens written in TEXT")
    p.add_argument("text")
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("node", help="run one browser node that joins a room and serves the mesh and the API")
    p.add_argument("--server", default="http://127.0.0.1:8000/", help="the tabmesh server's URL")
    p.add_argument("--room", default="lobby")
    p.add_argument("--headless", action=argparse.BooleanOptionalAction, default=True,
                   help="headless Chromium (default); --no-headless shows the window")
    p.add_argument("--model", help="a model file the server serves (default: its first GGUF)")
    p.add_argument("--backend", choices=("webgpu", "numpy"), help="default: WebGPU when the browser has it")
    p.add_argument("--api-key", help="the server's API key (default: $TABMESH_API_KEY)")
    p.add_argument("--no-api", action="store_true", help="join the mesh only; do not serve /v1/ requests")
    p.add_argument("--secret", help="the room secret: only tabs that hold it connect to this node "
                                    "(default: $TABMESH_ROOM_SECRET; never sent to the server)")
    p.set_defaults(fn=cmd_node)

    p = sub.add_parser("embed", help="sentence embeddings (all-MiniLM-L6-v2) computed in a headless tab")
    p.add_argument("--backend", choices=("webgpu", "numpy"), help="default: the page's choice (numpy on a CPU adapter)")
    p.add_argument("--json", action="store_true", help="print {model, backend, dim, vectors}")
    p.add_argument("text", nargs="+")
    p.set_defaults(fn=cmd_embed)

    p = sub.add_parser("rag", help="the tab's RAG index: `rag eval` measures retrieval")
    rag_sub = p.add_subparsers(dest="rag_command", required=True)
    p = rag_sub.add_parser("eval", help="ingest passages in a headless tab, reload, run queries: recall, MRR, timings")
    p.add_argument("--passages", required=True, help='JSON Lines of {"id", "title", "text"}')
    p.add_argument("--queries", required=True, help='JSON Lines of {"qid", "text", "relevant_ids"}')
    p.add_argument("--k", type=int, default=10, help="distinct passages retrieved per query (>= 10)")
    p.add_argument("--backend", choices=("webgpu", "numpy"), help="embedder backend (default: the page's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_rag_eval)

    p = sub.add_parser("mesh-run", help="N headless tabs split one model's layers and generate greedily")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--chat", action="store_true", help="render the prompt as one user message of the chat template")
    p.add_argument("--kill-node", type=int, help="kill this node's browser mid-generation (1..N-1)")
    p.add_argument("--after-tokens", type=int, default=1, help="... after this many tokens")
    p.add_argument("--throttle-node", type=int, help="slow this node down 4x before planning (1..N-1)")
    p.add_argument("--backend", choices=("webgpu", "numpy"), help="default: WebGPU where the browser has it")
    p.add_argument("--model", help="a GGUF file (default: the first model setup fetched)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_mesh_run)

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
