"""`leccr serve`: a JSON search API and a page that shows the hits (FastAPI + uvicorn).

    GET /api/search?q=...&lang=de&method=leccr&k=10[&candidates=200]   hits as JSON
    GET /api/info                                                       methods and their languages
    GET /media/<path>                                                   a media file of the dataset folder
    GET /frames/<path>                                                  a video's frame strip (JPEG, decord)
    GET /[?q=...&lang=de&method=leccr&k=10]                             the search page (the address holds
                                                                        the search: shared, bookmarked, back)

Media are served only from inside the dataset folder: a path that resolves outside it (`../`, an
absolute path, a link out) is a 404, as is a missing file. A bad request (empty or over-long query, an
unknown method or language, k out of range) is a 4xx whose `detail` says what is wrong. Searches run
on a fixed pool of threads behind a bounded queue (SearchQueue, configured by ServeConfig): when
`queue_depth` searches already wait, a search is answered 503 with `Retry-After` at once. Each model
loads once (SearchEngine.method).
"""
from __future__ import annotations

import asyncio
import functools
import io
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path

from leccr.config import ServeConfig
from leccr.search.engine import SearchEngine
from leccr.search.request import (DEFAULT_CANDIDATES, DEFAULT_K, MAX_K, MAX_QUERY_CHARS, BadQuery, UnknownLanguage,
                                  UnknownMethod, check_request)
from leccr.search.scheduler import Overloaded, SearchQueue

STRIP_FRAMES = 4
STRIP_HEIGHT = 96


def create_app(engine: SearchEngine, max_query_chars: int = MAX_QUERY_CHARS, serving: ServeConfig | None = None):
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import HTMLResponse, Response

    queue = SearchQueue(engine, serving or ServeConfig())

    @asynccontextmanager
    async def lifespan(app):
        yield
        queue.close()

    app = FastAPI(title="leccr search", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.search_queue = queue

    @app.get("/api/info")
    def info() -> dict:
        return {"process": os.getpid(),  # which server process answered (`leccr serve` may run several)
                "methods": {m: {"languages": engine.infos[m]["languages"], "alpha": engine.infos[m]["alpha"],
                                "items": engine.infos[m]["items"]} for m in engine.methods},
                "default_method": "leccr" if "leccr" in engine.methods else engine.methods[0],
                "default_candidates": DEFAULT_CANDIDATES, "max_query_chars": max_query_chars,
                "default_k": DEFAULT_K, "max_k": MAX_K}

    @app.get("/api/search")
    async def search(q: str = "", lang: str = "en", method: str = "leccr", k: int = Query(10),
                     candidates: int = Query(DEFAULT_CANDIDATES)) -> dict:
        try:
            text = check_request(q, k, candidates, max_query_chars).text
            engine.check(method, lang)  # a bad request takes no place in the queue
            hits = await asyncio.wrap_future(queue.submit(text, lang, method, k, candidates))
        except Overloaded as error:
            raise HTTPException(503, str(error), headers={"Retry-After": str(error.retry_after_s)}) from None
        except BadQuery as error:
            raise HTTPException(error.status, str(error)) from None
        except UnknownMethod as error:
            raise HTTPException(404, str(error)) from None
        except UnknownLanguage as error:
            raise HTTPException(400, str(error)) from None
        return {"query": text, "lang": lang, "method": method, "k": k, "candidates": candidates,
                "hits": [_hit_json(hit, lang, engine) for hit in hits]}

    @app.get("/media/{relative:path}")
    def media(relative: str):
        from fastapi.responses import FileResponse

        return FileResponse(_inside(engine, relative))

    @app.get("/frames/{relative:path}")
    def frames(relative: str) -> Response:
        from leccr.media.decode import MediaError

        try:
            strip = _frame_strip(_inside(engine, relative, "video"))
        except MediaError as error:  # an indexed video that no longer decodes: its fault, not the server's
            raise HTTPException(422, f"cannot read frames of {relative}: {error.reason}") from None
        return Response(strip, media_type="image/jpeg")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    def _inside(engine: SearchEngine, relative: str, media_type: str | None = None) -> Path:
        path = engine.media_file(relative, media_type)
        if path is None:
            raise HTTPException(404, f"no indexed {media_type or 'item'} has this media path")
        return path

    return app


def _hit_json(hit, lang: str, engine: SearchEngine) -> dict:
    data = hit.to_dict(lang)
    served = hit.path is not None and engine.media_file(hit.path) is not None
    data["media_url"] = f"/media/{hit.path}" if served else None
    data["frames_url"] = f"/frames/{hit.path}" if served and hit.media_type == "video" else None
    return data


@lru_cache(maxsize=256)
def _frame_strip(path: Path) -> bytes:
    """STRIP_FRAMES frames of a video side by side, STRIP_HEIGHT px high, as JPEG."""
    from PIL import Image

    from leccr.media.decode import sample_frames

    frames = sample_frames(path, num_frames=STRIP_FRAMES)
    frames = [f.resize((max(1, round(f.width * STRIP_HEIGHT / f.height)), STRIP_HEIGHT)) for f in frames]
    strip = Image.new("RGB", (sum(f.width for f in frames), STRIP_HEIGHT))
    x = 0
    for frame in frames:
        strip.paste(frame, (x, 0))
        x += frame.width
    out = io.BytesIO()
    strip.save(out, format="JPEG", quality=85)
    return out.getvalue()


class PortUnavailable(OSError):
    """The address to serve on cannot be bound (in use, not this machine's, not allowed)."""


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound before anything says "Serving": a busy port is one error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as error:
        sock.close()
        raise PortUnavailable(error.errno, f"cannot serve on {host}:{port}: {error.strerror}; "
                                           "choose another with --port (or --host)") from None
    return sock


def serve(root: str, experiment: str | None, data_root: str | None, device: str, host: str, port: int,
          serving: ServeConfig | None = None) -> int:
    serving = serving or ServeConfig()
    sock = listen(host, port)
    opener = functools.partial(SearchEngine.open, root, experiment, data_root, device)
    return serve_on(sock, opener, serving, f"http://{host}:{port}/")


def serve_on(sock: socket.socket, open_engine: Callable[[], SearchEngine], serving: ServeConfig, url: str) -> int:
    """Serve on a bound socket: in this process, or in `serving.process_count()` processes that share it.

    Several processes: each opens the index and loads every method's model once (`open_engine` is
    called in each: it must pickle), then accepts connections from the one listening socket; the
    kernel hands each new connection to a process waiting in accept, so a process busy searching
    leaves the next connection to another. Each has its own queue of `queue_depth`. A process that
    dies is started again; Ctrl+C or SIGTERM stops them all."""
    count = serving.process_count()
    if count == 1:
        engine = _ready_engine(open_engine, serving)
        print(_serving_line(_where(engine), url, serving, [(os.getpid(), _memory())]), flush=True)
        _run_uvicorn(engine, serving, sock)
        return 0
    return ServerProcesses(sock, open_engine, serving, count).run(url)


def _ready_engine(open_engine: Callable[[], SearchEngine], serving: ServeConfig) -> SearchEngine:
    import torch

    # Process-wide: every search thread's torch ops use this many threads (workers x threads ~ cores).
    torch.set_num_threads(serving.torch_threads)
    engine = open_engine()
    for method in engine.methods:  # loaded now, once, rather than by the first search that needs it
        engine.method(method)
    return engine


def _run_uvicorn(engine: SearchEngine, serving: ServeConfig, sock: socket.socket) -> None:
    import uvicorn

    uvicorn.Server(uvicorn.Config(create_app(engine, serving=serving), log_level="warning")).run(sockets=[sock])


def _memory() -> dict[str, int]:
    """This process's resident memory (bytes): all of it, and the part that is its own (anonymous), as
    opposed to mapped files such as torch's libraries, which processes share."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "anon": int(fields["RssAnon"].split()[0]) * 1024}


def _serving_line(where: tuple[str, list[str], str], url: str, serving: ServeConfig,
                  processes: list[tuple[int, dict]]) -> str:
    """The start-up line: what is served where, how searches run, and each process's memory."""
    index_dir, methods, data_root = where
    memory = ", ".join(f"{pid}: {m['rss'] / 2**20:.0f} MiB ({m['anon'] / 2**20:.0f} MiB its own)"
                       for pid, m in processes)
    return (f"Serving {index_dir} ({', '.join(methods)}; media from {data_root}) on {url} "
            f"({len(processes)} process{'es' if len(processes) > 1 else ''} x {serving.workers} search workers x "
            f"{serving.torch_threads} torch threads, batches of up to {serving.max_batch}, {serving.queue_depth} "
            f"may wait per process; memory per process {memory})")


def _where(engine: SearchEngine) -> tuple[str, list[str], str]:
    return str(engine.index_dir), engine.methods, str(engine.data_root)


def _process_main(sock: socket.socket, open_engine: Callable[[], SearchEngine], serving: ServeConfig,
                  report: Connection) -> None:
    """One server process: load, say so (or say why not), serve until stopped."""
    try:
        engine = _ready_engine(open_engine, serving)
    except BaseException as error:  # noqa: BLE001 - told to the parent, which stops and says why
        report.send(("error", f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from None
    report.send(("ready", os.getpid(), _memory(), _where(engine)))
    report.close()
    _run_uvicorn(engine, serving, sock)


class ServerProcesses:
    """`count` spawned server processes on one socket: started, watched, restarted, stopped."""

    def __init__(self, sock: socket.socket, open_engine: Callable[[], SearchEngine], serving: ServeConfig,
                 count: int):
        self.sock, self.open_engine, self.serving, self.count = sock, open_engine, serving, count
        # Spawned, not forked: torch's OpenMP pool does not survive a fork, and a fresh process loads
        # only what serving needs.
        self.context = multiprocessing.get_context("spawn")
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def start(self, count: int) -> list[tuple]:
        """Start `count` processes (loading side by side) and wait until each serves; their "ready"
        messages. When one cannot start, the others are stopped and the reason raised."""
        started = []
        for _ in range(count):
            receive, send = self.context.Pipe(duplex=False)
            process = self.context.Process(target=_process_main, name="leccr-serve", daemon=True,
                                           args=(self.sock, self.open_engine, self.serving, send))
            process.start()
            send.close()
            self.processes.append(process)
            started.append((process, receive))
        messages = []
        for process, receive in started:
            try:
                message = receive.recv()
            except EOFError:  # it died before saying anything
                process.join()
                message = ("error", f"exited with code {process.exitcode}")
            finally:
                receive.close()
            if message[0] == "error":
                raise RuntimeError(f"a server process could not start: {message[1]}")
            messages.append(message)
        return messages

    def run(self, url: str) -> int:
        previous = signal.signal(signal.SIGTERM, self._on_term)
        try:
            ready = self.start(self.count)
            print(_serving_line(ready[0][3], url, self.serving, [(m[1], m[2]) for m in ready]), flush=True)
            while True:
                ended = multiprocessing.connection.wait([p.sentinel for p in self.processes])
                for process in [p for p in self.processes if p.sentinel in ended]:
                    process.join()
                    print(f"server process {process.pid} exited with code {process.exitcode}; starting another",
                          flush=True)
                    self.processes.remove(process)
                    self.start(1)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop()
        return 0

    def _on_term(self, signum, frame) -> None:
        raise KeyboardInterrupt

    def stop(self) -> None:
        """SIGTERM each (uvicorn finishes the requests in flight), then wait; kill what outlives 30 s."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leccr search</title>
<style>
 /* CJK fonts named after the Latin ones: a query or caption in Chinese or Japanese shows as text, not
    boxes, wherever one of these common families is installed (Noto/Source Han, WenQuanYi, PingFang,
    Hiragino, Microsoft YaHei, Meiryo). */
 body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC",
        "Noto Sans CJK JP", "Source Han Sans SC", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
        "PingFang SC", "Hiragino Sans", "Hiragino Sans GB", "Microsoft YaHei", "Meiryo", sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
 form { display: flex; gap: .5rem; margin-bottom: 1rem; }
 #q { flex: 1; font-size: 1.1rem; padding: .4rem; font-family: inherit; }
 #k { width: 4.5rem; }
 .source { color: #666; font-size: .85rem; } .random { color: #a40; }
 #status { color: #666; margin-bottom: .5rem; min-height: 1.2em; }
 #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: .8rem; }
 .card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; cursor: pointer; }
 .card.open { outline: 2px solid #36c; }
 .card img { width: 100%; max-height: 180px; object-fit: contain; background: #eee; image-rendering: pixelated; }
 .score { font-weight: bold; } .id { color: #555; font-size: .85rem; }
 .caption { font-size: .9rem; margin: .3rem 0; }
 #detail { margin-top: 1rem; background: #fff; border: 1px solid #ccc; padding: .8rem; display: none; }
 #detail li { margin: .2rem 0; }
</style></head>
<body>
<h1>leccr search</h1>
<form id="search">
 <input id="q" name="q" placeholder="a query in any trained language" autofocus>
 <select id="lang" name="lang"></select>
 <select id="method" name="method"></select>
 <label for="k">hits</label> <input id="k" name="k" type="number" min="1" value="10">
 <button id="go" type="submit">Search</button>
</form>
<div id="status"></div>
<div id="results"></div>
<div id="detail"></div>
<script>
const $ = (id) => document.getElementById(id);
let info = null;
function esc(text) { const d = document.createElement("div"); d.textContent = text ?? ""; return d.innerHTML; }
function fillLanguages() {
  const langs = info.methods[$("method").value].languages, keep = $("lang").value;
  $("lang").innerHTML = langs.map((l) => `<option>${l}</option>`).join("");
  if (langs.includes(keep)) $("lang").value = keep;
}
// The address holds the search (?q=...&lang=de&method=leccr&k=5): a result can be shared, bookmarked and
// returned to with the back button. A search adds a history entry; opening an address or going back or
// forward shows the search it holds, without adding one.
function fromAddress() {
  const params = new URLSearchParams(location.search);
  return {q: params.get("q") ?? "", lang: params.get("lang") ?? $("lang").value,
          method: params.get("method") ?? info.default_method, k: params.get("k") ?? String(info.default_k)};
}
function show(search) {  // the form as the search says; a method or language the index lacks keeps the default
  $("q").value = search.q;
  if (search.method in info.methods) $("method").value = search.method;
  fillLanguages();
  if (info.methods[$("method").value].languages.includes(search.lang)) $("lang").value = search.lang;
  $("k").value = search.k;
  document.title = search.q ? `${search.q} · leccr search` : "leccr search";
}
function followAddress() {
  const search = fromAddress();
  show(search);
  if (search.q) { run(search); return; }
  latest++;  // an answer still on its way is for another address
  $("status").textContent = "";
  $("results").innerHTML = "";
  $("detail").style.display = "none";
}
async function start() {
  info = await (await fetch("/api/info")).json();
  $("method").innerHTML = Object.keys(info.methods).map((m) => `<option>${m}</option>`).join("");
  $("method").value = info.default_method;
  $("k").max = info.max_k;
  $("k").value = info.default_k;
  fillLanguages();
  $("method").addEventListener("change", fillLanguages);
  window.addEventListener("popstate", followAddress);
  followAddress();
  document.body.dataset.ready = "1";
}
function source(hit) {  // where the description comes from; the random-weight demo models' noise says so
  if (!hit.description_source) return "";
  return `<p class="source${hit.description_random_weights ? " random" : ""}">from ${esc(hit.description_source)}</p>`;
}
function showDetail(hit, card) {
  document.querySelectorAll(".card.open").forEach((c) => c.classList.remove("open"));
  card.classList.add("open");
  const captions = hit.captions.map((c) => `<li><b>${esc(c.lang)}</b> (${esc(c.kind)}): ${esc(c.text)}</li>`).join("");
  $("detail").innerHTML = `<h3>${esc(hit.item_id)} <small>(${esc(hit.split)}, ${esc(hit.media_type)})</small></h3>
    <p>score ${hit.score.toFixed(4)} · cosine ${hit.global_score.toFixed(4)} · ${esc(hit.path)}</p>
    <h4>Captions</h4><ul class="captions">${captions}</ul>
    <h4>Description</h4>${source(hit)}<p class="description">${esc(hit.description || "(none)")}</p>`;
  $("detail").style.display = "block";
  $("detail").scrollIntoView({block: "nearest"});
}
let latest = 0;  // the newest search: an older one's answer, arriving late, is not shown
$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const search = {q: $("q").value, lang: $("lang").value, method: $("method").value, k: $("k").value};
  const address = "?" + new URLSearchParams(search);
  if (address !== location.search) history.pushState(null, "", address);
  show(search);
  run(search);
});
async function run(search) {
  const mine = ++latest;
  $("status").textContent = "searching…";
  const response = await fetch("/api/search?" + new URLSearchParams(search));
  const body = await response.json();
  if (mine !== latest) return;
  if (!response.ok) {  // a 4xx names what is wrong: as text, or (a value that is not a number) per parameter
    const detail = typeof body.detail === "string" ? body.detail
      : (body.detail || []).map((d) => `${d.loc?.at(-1)}: ${d.msg}`).join("; ") || response.statusText;
    $("status").textContent = "error: " + detail;
    $("results").innerHTML = "";
    return;
  }
  $("status").textContent = `${body.hits.length} hits for “${body.query}” (${body.lang}, ${body.method})`;
  $("results").innerHTML = "";
  $("detail").style.display = "none";
  for (const hit of body.hits) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.itemId = hit.item_id;
    const picture = hit.frames_url || hit.media_url;
    card.innerHTML = (picture ? `<img src="${picture}" alt="${esc(hit.item_id)}">` : "<div>(no media)</div>") +
      `<div><span class="score">${hit.score.toFixed(3)}</span> <span class="id">#${hit.rank} ${esc(hit.item_id)}</span></div>` +
      `<div class="caption">${esc(hit.caption)}</div>`;
    card.addEventListener("click", () => showDetail(hit, card));
    $("results").appendChild(card);
  }
}
start();
</script>
</body></html>
"""
