"""`leccr search` and `leccr serve`: queries against the index of a run."""
from __future__ import annotations

import argparse

from leccr.cli.common import Commands


def _index_source(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """(artifact root, experiment, dataset folder) from --config, else from the separate options."""
    if args.config is None:
        return args.root, args.experiment, args.data_root
    from leccr.config import load_config

    cfg = load_config(args.config)
    return cfg.artifacts_root, args.experiment or cfg.name, args.data_root or cfg.dataset.path


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from leccr.search.request import check_request

    # The same checks and messages as the API's, before the index opens or a model library loads.
    request = check_request(args.query, args.k, args.candidates)
    from leccr.search.engine import SearchEngine

    engine = SearchEngine.open(*_index_source(args), args.device)
    engine.check(args.method, args.lang)
    hits = engine.search([request.text], args.lang, args.method, request.k, request.candidates)[0]
    if args.json:
        print(json.dumps({"query": request.text, "lang": args.lang, "method": args.method, "k": request.k,
                          "candidates": request.candidates, "index": str(engine.index_dir),
                          "hits": [hit.to_dict(args.lang) for hit in hits]}, ensure_ascii=False, indent=2))
        return 0
    print(f"{len(hits)} hits for {request.text!r} ({args.lang}, {args.method}; index {engine.index_dir.name}):")
    for hit in hits:
        print(f"{hit.rank:>3}. {hit.item_id:<16} score {hit.score:.4f} (cosine {hit.global_score:.4f})  {hit.path or '-'}")
        print(f"     caption: {hit.caption(args.lang)}")
        if hit.description:
            snippet = hit.description if len(hit.description) <= 100 else hit.description[:97] + "..."
            print(f"     description: {snippet}")
            if hit.description_source:
                print(f"       (from {hit.description_source})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from leccr.config import ServeConfig
    from leccr.search.server import serve

    given = {name: getattr(args, name) for name in ServeConfig.model_fields if getattr(args, name) is not None}
    try:
        serving = ServeConfig(**given)
    except ValidationError as error:  # name the option as typed, not the model's field
        raise ValueError("; ".join(f"--{p['loc'][0].replace('_', '-')} {p['input']}: {p['msg']}"
                                   for p in error.errors())) from None
    return serve(*_index_source(args), args.device, args.host, args.port, serving)


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="an experiment file: its artifacts_root, name and dataset.path "
                                         "(the media folder, wherever it lies now) in place of the three options below")
    parser.add_argument("--root", default="artifacts", help="artifact root (default artifacts)")
    parser.add_argument("--experiment", help="the index of this experiment's last run (default: the latest index)")
    parser.add_argument("--data-root", help="the dataset folder holding the media (default: the dataset stage's path)")
    parser.add_argument("--device", default="auto", help="where the query encoder runs (default auto)")


def _count_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def add_commands(commands: Commands) -> None:
    from leccr.search.request import DEFAULT_CANDIDATES, DEFAULT_K, MAX_CANDIDATES, MAX_K

    search = commands.add("search", "find indexed images/videos with a text query in a trained language")
    search.add_argument("query", help='the query text, e.g. "ein Hund rennt durch den Schnee"')
    search.add_argument("--lang", default="en", help="the query's language (one the method was trained on; default en)")
    search.add_argument("--method", default="leccr", help="the trained method to search with (default leccr)")
    search.add_argument("-k", type=int, default=DEFAULT_K, help=f"hits to print, 1 to {MAX_K} (default {DEFAULT_K})")
    search.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help="items taken from the vector index by global cosine and re-ranked by the method's "
                             f"inference score, 1 to {MAX_CANDIDATES} (default {DEFAULT_CANDIDATES})")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    _index_arguments(search)
    search.set_defaults(handler=cmd_search)

    serve = commands.add("serve", "HTTP search API (/api/search) and a web page over the index")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--processes", type=_count_or_auto,
                       help="server processes sharing the port, each with its own models (default auto: one per "
                            "core, at most 4)")
    serve.add_argument("--workers", type=int, help="searches run at once per process (default 1; processes x "
                                                   "workers x torch threads <= cores)")
    serve.add_argument("--torch-threads", type=int, help="torch threads of each search (default 1)")
    serve.add_argument("--max-batch", type=int, help="waiting queries of the same method, language and k "
                                                     "answered together (default 16; 1 = none)")
    serve.add_argument("--queue-depth", type=int,
                       help="searches that may wait per process; past that a search is answered 503 + Retry-After "
                            "(default 64)")
    serve.add_argument("--retry-after-s", type=int, help="the Retry-After seconds of a 503 (default 1)")
    _index_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
