"""An OpenAI-compatible client for judge and policy servers (lmdeploy, vLLM, any other).

* Several base URLs (one server per GPU, as in the seed system): requests go round-robin to the
  servers that are up; a server that fails to connect or answers 5xx is benched for a cool-down
  and the request moves on to the next one.
* Retries with exponential backoff (and jitter) on time-outs, dropped connections, 5xx / 429 and
  bodies that are not the JSON of a completion; a ``Retry-After`` header (seconds or an HTTP date,
  capped at ``MAX_RETRY_AFTER``) sets the wait instead. Other 4xx are the caller's mistake: no retry.
  401 / 403 / 404 (bad key, no access, wrong model or URL) raise ``ServerUnusable`` at once: every
  other request would get the same answer; so does lmdeploy's 400 for log-probs on a server started
  without ``--logprobs-mode``. Other 400 / 422 fail that request only; each status is
  counted in ``stats.failures`` and the server's message is shown once (``stats.messages``).
* Dead servers: when every server's latest connection attempts failed (refused, DNS, connect
  time-out), ``DEAD_AFTER_FAILURES`` per server in all over at least ``DEAD_AFTER_SECONDS``, with no
  answer from any server since, ``ServerUnusable`` is raised (and every later request raises it) instead of
  retrying wave after wave. ``probe_servers`` checks ``/models`` of each server before a run.
* ``score_continuations``: the log-probability of given texts as the continuation of the judge's
  own (partial) reply, through vLLM's ``continue_final_message`` extension. Single-token
  continuations (verdict labels) are read in one request as the next token's log-probs of the
  given ids (``logprob_token_ids``; the prompt is a prefix of what the judgement request already
  computed, so vLLM's prefix cache serves it); otherwise one ``prompt_logprobs`` request per
  continuation (which vLLM cannot serve from its prefix cache). Servers without these extensions
  (lmdeploy) are detected on first use and the caller falls back to ``top_logprobs`` of the
  generated tokens, then to text only.
The API key is read from an environment variable and never logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable

import httpx

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}  # the same answer for every request: stop the run at once
MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After is cut to this
DEAD_AFTER_FAILURES = 3  # consecutive failed connection attempts per server ...
DEAD_AFTER_SECONDS = 1.0  # ... spanning at least this long, on every server: none answers
MESSAGE_CHARS = 300
NO_EXTENSION = (400, 422)  # a server without vLLM's request fields rejects them with these
NO_ENDPOINT = (400, 401, 403, 404, 405, 422)  # ... and answers these for a route it lacks (/tokenize)
LOGPROBS_OFF = "not enabled logprobs_mode"  # lmdeploy 0.16's 400 for log-probs unless --logprobs-mode


class RequestFailed(RuntimeError):
    """A request that failed for good (after retries, or a non-retryable 4xx)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ServerUnusable(RequestFailed):
    """No request can succeed: the server(s) refuse the key, the model or the URL (401 / 403 /
    404), or none answers at all. A run should stop at once with this one-line message (what is
    finished is kept); the client raises it again for every later request."""


def status_text(status: int) -> str:
    """``401 Unauthorized``."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def server_message(response: httpx.Response, secret: str | None = None) -> str:
    """What the server says about an error, on one line and at most ``MESSAGE_CHARS`` characters:
    the body's ``error.message`` (OpenAI, vLLM), ``message`` (lmdeploy) or ``detail`` (FastAPI),
    else its text. ``secret`` (the API key) is never shown, even if the server echoes it."""
    text = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        for found in ((error.get("message") if isinstance(error, dict) else error), body.get("message"), body.get("detail")):
            if isinstance(found, list):  # FastAPI validation errors: [{"loc": [...], "msg": ...}]
                found = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in found)
            if found:
                text = found if isinstance(found, str) else json.dumps(found)
                break
    if not text:
        text = response.text
    text = " ".join(str(text).split())
    if secret and secret != "EMPTY":
        text = text.replace(secret, "***")
    if len(text) > MESSAGE_CHARS:
        text = text[: MESSAGE_CHARS - 3] + "..."
    return text or "(no message)"


def retry_after_seconds(response: httpx.Response) -> float | None:
    """A ``Retry-After`` header in seconds (it may also be an HTTP date), capped at
    ``MAX_RETRY_AFTER``; None without a readable one."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def connect_error_text(e: Exception) -> str:
    """``connection refused``, ``name not resolved``, ``connect timed out`` ... from an httpx error."""
    if isinstance(e, httpx.ConnectTimeout):
        return "connect timed out"
    causes, x = [], e
    while x is not None and len(causes) < 8:  # httpx wraps the OSError that says what happened
        causes.append(x)
        x = x.__cause__ or x.__context__
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return "connection refused"
    text = " ".join(str(c) for c in causes).lower()
    for needle, says in (("refused", "connection refused"), ("name or service", "name not resolved"),
                         ("nodename", "name not resolved"), ("temporary failure in name", "name not resolved"),
                         ("no address", "name not resolved"), ("unreachable", "network unreachable"),
                         ("no route", "no route to host")):
        if needle in text:
            return says
    return type(e).__name__ + (f": {str(e)[:100]}" if str(e) else "")


@dataclass
class _Server:
    base_url: str
    down_until: float = 0.0
    failures: int = 0
    connect_failures: int = 0  # consecutive failed connection attempts (no HTTP answer)
    connect_failing_since: float = 0.0
    last_connect_error: str = ""


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)  # the server's first message per failure kind

    def count(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


class OpenAIClient:
    def __init__(
        self,
        base_urls: list[str] | str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 5,
        concurrency: int = 16,
        cooldown: float = 10.0,
        backoff: float = 0.5,
        seed: int = 0,
        show: Callable[[str], None] | None = None,
    ):
        """``base_urls``: one server's URL, or a list of them (requests spread over them).
        ``show``: where a server's error message is shown, once per kind (default: stderr)."""
        urls = [u.strip().rstrip("/") for u in ([base_urls] if isinstance(base_urls, str) else base_urls) if u.strip()]
        if not urls:
            raise ValueError("no judge base URL given (--base_url)")
        self.servers = [_Server(u) for u in urls]
        self.model = model
        self.max_retries = max_retries
        self.cooldown = cooldown
        self.backoff = backoff
        self.stats = ClientStats()
        self.fatal: ServerUnusable | None = None  # once set, every request raises it
        self._show = show or (lambda line: print(line, file=sys.stderr, flush=True))
        self.supports_scoring: bool | None = None  # learned on first use
        self.supports_token_scoring: bool | None = None  # /tokenize + logprob_token_ids (vLLM >= 0.32)
        self._label_ids: dict[tuple[str, tuple[str, ...]], list[int] | None] = {}
        self._next = 0
        self._rng = random.Random(seed)
        self._limit = asyncio.Semaphore(concurrency)
        key = os.environ.get(api_key_env) or "EMPTY"
        self._secret = key
        self._key_env = api_key_env
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            # a connection takes milliseconds, or never comes: do not wait the whole --timeout for it
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), headers={"Authorization": f"Bearer {key}"},
            limits=httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    def _pick_server(self) -> _Server:
        now = time.monotonic()
        n = len(self.servers)
        for k in range(n):
            server = self.servers[(self._next + k) % n]
            if server.down_until <= now:
                self._next = (self._next + k + 1) % n
                return server
        # all benched: take the one that comes back first
        return min(self.servers, key=lambda s: s.down_until)

    def _bench(self, server: _Server, why: str) -> None:
        """Skip a failing server for a cool-down, if another one is up to take its requests
        (with a single server, benching would only add idle time to the retry backoff)."""
        server.failures += 1
        now = time.monotonic()
        if any(s is not server and s.down_until <= now for s in self.servers):
            server.down_until = now + self.cooldown
            logger.warning("judge server %s benched for %.0fs: %s", server.base_url, self.cooldown, why)

    async def post(self, path: str, payload: dict, expected: tuple[int, ...] = ()) -> dict:
        """POST ``payload`` (with ``model`` filled in) to one of the servers, retrying; the
        answer must be a completion (with ``choices``). ``expected``: see ``request``."""
        return await self.request("POST", path, {"model": self.model, **payload}, need_choices=True, expected=expected)

    async def get(self, path: str) -> dict:
        return await self.request("GET", path, None, need_choices=False)

    def note_failure(self, kind: str, where: str, message: str) -> None:
        """Count a failure and show the server's message the first time this kind occurs."""
        self.stats.count(kind)
        if kind not in self.stats.messages:
            self.stats.messages[kind] = message
            self._show(f"[judge] {where}: {message} (shown once; later ones are counted in request_failures['{kind}'])")

    def _answered(self, server: _Server) -> None:
        server.connect_failures = 0

    def _connect_failed(self, server: _Server, error: str) -> None:
        """A connection attempt that got no HTTP answer; ``ServerUnusable`` once no server answers."""
        now = time.monotonic()
        if server.connect_failures == 0:
            server.connect_failing_since = now
        server.connect_failures += 1
        server.last_connect_error = error
        # every server's latest attempts failed, none answered since, and the failures add up
        # (a benched server gets no attempts while the others are tried: it counts with one)
        if (all(s.connect_failures >= 1 for s in self.servers)
                and sum(s.connect_failures for s in self.servers) >= DEAD_AFTER_FAILURES * len(self.servers)
                and now - min(s.connect_failing_since for s in self.servers) >= DEAD_AFTER_SECONDS):
            self._set_fatal(ServerUnusable(self.dead_message()))

    def dead_message(self) -> str:
        where = ", ".join(f"{s.base_url} ({s.last_connect_error or 'no answer'})" for s in self.servers)
        return (f"no judge server answers at {where}; start it or fix --base_url "
                "(finished labels are kept: rerun the same command to resume)")

    def _set_fatal(self, error: ServerUnusable) -> None:
        if self.fatal is None:
            self.fatal = error
        self._raise_fatal()

    def _raise_fatal(self) -> None:
        # a new exception each time: one instance raised by every request would pile up their tracebacks
        raise ServerUnusable(str(self.fatal), status=self.fatal.status)

    def _fatal_status(self, server: _Server, response: httpx.Response) -> ServerUnusable:
        status = response.status_code
        hint = {401: f"check the API key in ${self._key_env}, the variable --api_key_env names",
                403: "check the API key's access", 404: "check --model and --base_url"}[status]
        return ServerUnusable(f"judge {server.base_url} answered {status_text(status)}: "
                              f"{server_message(response, self._secret)} ({hint})", status=status)

    async def probe_servers(self, timeout: float = 10.0) -> dict[str, list[str] | None]:
        """``GET /models`` of every server once (no retries), before a run: the models each lists
        (None: it answered without a list). A server that does not answer is benched;
        ``ServerUnusable`` when none answers, or when one refuses the key (401 / 403)."""
        listed: dict[str, list[str] | None] = {}
        for server in self.servers:
            try:
                response = await self._http.get(server.base_url + "/models", timeout=min(self.timeout, timeout))
            except httpx.TimeoutException as e:
                server.last_connect_error = connect_error_text(e) if isinstance(e, httpx.ConnectTimeout) else "timed out"
                continue
            except httpx.TransportError as e:
                server.last_connect_error = connect_error_text(e)
                continue
            if response.status_code in (401, 403):
                self._set_fatal(self._fatal_status(server, response))
            listed[server.base_url] = None
            if response.status_code == 200:
                try:
                    body = response.json()
                    listed[server.base_url] = [m["id"] for m in body.get("data", []) if isinstance(m, dict) and m.get("id")]
                except (ValueError, AttributeError):
                    pass
        if not listed:
            self._set_fatal(ServerUnusable(self.dead_message()))
        for server in self.servers:
            if server.base_url not in listed and len(self.servers) > 1:
                server.down_until = time.monotonic() + self.cooldown
                self._show(f"[judge] {server.base_url} does not answer ({server.last_connect_error}); "
                           f"using the other server(s)")
        return listed

    async def request(self, method: str, path: str, payload: dict | None, need_choices: bool,
                      root: bool = False, expected: tuple[int, ...] = ()) -> dict:
        """One request to one of the servers, retrying what a retry can fix. ``root``: ``path``
        is under the server's root, not its ``/v1`` API (vLLM's ``/tokenize``). ``expected``:
        4xx statuses the caller handles itself (a probe for an extension the server may lack):
        raised as ``RequestFailed`` without counting or showing them, and never fatal."""
        last_error = "no attempt"
        retry_after = None
        for attempt in range(self.max_retries + 1):
            if self.fatal is not None:
                self._raise_fatal()
            if attempt:
                self.stats.retries += 1
                delay = min(self.backoff * 2 ** (attempt - 1), 30.0) * (0.5 + self._rng.random())
                await asyncio.sleep(retry_after if retry_after is not None else delay)
                if self.fatal is not None:
                    self._raise_fatal()
            retry_after = None
            server = self._pick_server()
            wait = server.down_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.stats.requests += 1
            url = (server.base_url.removesuffix("/v1") if root else server.base_url) + path
            try:
                async with self._limit:
                    if self.fatal is not None:  # decided while this one waited for a slot
                        self._raise_fatal()
                    response = await self._http.request(method, url, json=payload)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # refused, DNS, nothing listening
                self.stats.count("connection")
                last_error = f"{connect_error_text(e)} at {server.base_url}"
                self._bench(server, connect_error_text(e))
                self._connect_failed(server, connect_error_text(e))
                continue
            except httpx.TimeoutException:
                self.stats.count("timeout")
                last_error = f"timeout from {server.base_url}"
                continue
            except httpx.TransportError as e:  # reset, dropped mid-body
                self.stats.count("connection")
                self._bench(server, type(e).__name__)
                last_error = f"{type(e).__name__} from {server.base_url}"
                continue
            self._answered(server)
            status = response.status_code
            if status in expected:
                raise RequestFailed(f"HTTP {status} from {url}: {server_message(response, self._secret)}", status=status)
            if status in RETRYABLE_STATUS:
                message = server_message(response, self._secret)
                self.note_failure(f"http_{status}", f"{url} answered {status_text(status)}", message)
                if status >= 500:
                    self._bench(server, f"HTTP {status}")
                retry_after = retry_after_seconds(response)
                last_error = f"{status_text(status)} from {server.base_url}: {message}"
                continue
            if status in FATAL_STATUS and not root:
                self._set_fatal(self._fatal_status(server, response))
            if status >= 400:
                message = server_message(response, self._secret)
                if status == 400 and LOGPROBS_OFF in message:
                    # lmdeploy's PyTorch backend refuses every request that asks for log-probs, as
                    # every vote does: the same answer each time, so stop at once
                    self._set_fatal(ServerUnusable(
                        f"{server.base_url} refuses log-probs ({message}): an lmdeploy server on its PyTorch "
                        "backend must be started with --logprobs-mode raw_logprobs (configs/judge_lmdeploy.md)",
                        status=status))
                self.note_failure(f"http_{status}", f"{url} answered {status_text(status)}", message)
                raise RequestFailed(f"{status_text(status)} from {url}: {message}", status=status)
            try:
                body = response.json()
                if not isinstance(body, dict) or (need_choices and not body.get("choices")):
                    raise ValueError("not a completion")
            except ValueError:
                self.stats.count("bad_body")
                last_error = f"unreadable body from {server.base_url}"
                continue
            server.failures = 0
            return body
        raise RequestFailed(f"{path} failed after {self.max_retries + 1} attempts: {last_error}")

    async def chat_choices(self, messages: list[dict], **params) -> list[dict]:
        """``/chat/completions``; every choice (``message``, ``logprobs``...)."""
        body = await self.post("/chat/completions", {"messages": messages, **params})
        choices = body["choices"]
        if not all(isinstance((ch.get("message") or {}).get("content"), str) for ch in choices):
            raise RequestFailed("chat completion without text content")
        return choices

    async def chat(self, messages: list[dict], **params) -> dict:
        """The first choice of a ``/chat/completions`` answer."""
        return (await self.chat_choices(messages, **params))[0]

    async def served_models(self) -> list[str]:
        body = await self.get("/models")
        return [m["id"] for m in body.get("data", []) if isinstance(m, dict) and m.get("id")]

    async def single_token_ids(self, reply_prefix: str, continuations: list[str], tail_chars: int = 64) -> list[int] | None:
        """Each continuation's token id when it is exactly one token after ``reply_prefix`` (None
        otherwise, or without the server's ``/tokenize``). Tokenizers split at spaces and
        punctuation first, so the boundary depends only on the prefix's end: its last
        ``tail_chars`` characters are tokenized, with and without each continuation, once per
        distinct end (the judge passes its verdict prefix's length: one lookup per run)."""
        key = (reply_prefix[-max(tail_chars, 1):], tuple(continuations))
        if key not in self._label_ids:
            async def ids(text: str) -> list[int]:
                body = await self.request("POST", "/tokenize", {"model": self.model, "prompt": text,
                                                                "add_special_tokens": False}, need_choices=False, root=True,
                                          expected=NO_ENDPOINT)
                if not isinstance(body.get("tokens"), list):
                    raise RequestFailed("/tokenize answered without tokens", status=404)
                return body["tokens"]

            try:
                base = await ids(key[0])
                found = []
                for text in continuations:
                    full = await ids(key[0] + text)
                    if len(full) != len(base) + 1 or full[:-1] != base:
                        found = None
                        break
                    found.append(int(full[-1]))
            except RequestFailed as e:
                if e.status in NO_ENDPOINT and not isinstance(e, ServerUnusable):  # no /tokenize here
                    self.supports_token_scoring = False
                    return None
                raise
            self._label_ids[key] = found if found and len(set(found)) == len(found) else None
        return self._label_ids[key]

    async def score_next_token(self, messages: list[dict], reply_prefix: str, token_ids: list[int]) -> list[float] | None:
        """Log-probs of ``token_ids`` as the next token after ``reply_prefix`` (raw: before
        temperature or any other processing), in one request; None when the server lacks the
        extensions."""
        payload = {
            "messages": messages + [{"role": "assistant", "content": reply_prefix}],
            "continue_final_message": True, "add_generation_prompt": False, "max_tokens": 1, "temperature": 0.0,
            "logprobs": True, "logprob_token_ids": token_ids, "return_tokens_as_token_ids": True,
        }
        # until the server is known to take the extensions, a 400 / 422 says it does not (the
        # pairs in flight all probe at once: each of them learns it, none of them fails)
        probing = self.supports_token_scoring is not True
        try:
            body = await self.post("/chat/completions", payload, expected=NO_EXTENSION if probing else ())
        except RequestFailed as e:
            if probing and e.status in NO_EXTENSION and not isinstance(e, ServerUnusable):
                self.supports_token_scoring = False
                return None
            raise
        content = ((body["choices"][0].get("logprobs") or {}).get("content") or [{}])[0]
        found = {}
        for entry in content.get("top_logprobs") or []:
            token = str(entry.get("token", ""))
            if token.startswith("token_id:"):
                found[int(token.removeprefix("token_id:"))] = entry["logprob"]
        if not all(i in found for i in token_ids):
            if self.supports_token_scoring is not True:  # the server ignored the extension
                self.supports_token_scoring = False
                return None
            raise RequestFailed("token scoring response without the requested log-probs")
        self.supports_token_scoring = True
        return [found[i] for i in token_ids]

    async def score_continuations(self, messages: list[dict], reply_prefix: str, continuations: list[str],
                                  tail_chars: int = 64) -> list[float] | None:
        """Sum of log-probs of each continuation's tokens after ``reply_prefix`` (the judge's
        reply so far), from the first token where they differ; None when the server lacks the
        vLLM scoring extensions. ``tail_chars``: see ``single_token_ids``."""
        if self.supports_token_scoring is not False:
            ids = await self.single_token_ids(reply_prefix, continuations, tail_chars)
            if ids is not None:
                scores = await self.score_next_token(messages, reply_prefix, ids)
                if scores is not None:
                    return scores
        if self.supports_scoring is False:
            return None
        scored = []
        for text in continuations:
            payload = {
                "messages": messages + [{"role": "assistant", "content": reply_prefix + text}],
                "continue_final_message": True, "add_generation_prompt": False,
                "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0,
            }
            probing = self.supports_scoring is not True
            try:
                body = await self.post("/chat/completions", payload, expected=NO_EXTENSION if probing else ())
            except RequestFailed as e:
                if probing and e.status in NO_EXTENSION and not isinstance(e, ServerUnusable):
                    self.supports_scoring = False  # the server rejects the extensions
                    return None
                raise
            ids, lps = body.get("prompt_token_ids"), body.get("prompt_logprobs")
            if lps and not ids and all(e is None or len(e) == 1 for e in lps):
                # with prompt_logprobs=0 each position lists only the prompt's own token
                ids = [None if e is None else int(next(iter(e))) for e in lps]
                ids[0] = ids[0] if ids[0] is not None else -1
            if not ids or not lps or len(ids) != len(lps):
                if self.supports_scoring is not True:  # the server ignores the extensions
                    self.supports_scoring = False
                    return None
                raise RequestFailed("scoring response without prompt_logprobs")
            self.supports_scoring = True
            scored.append([(tok, None if e is None else e[str(tok)]["logprob"]) for tok, e in zip(ids, lps)])
        # the continuations differ from the first differing token on: sum from there to the end
        first = 0
        while all(first < len(s) for s in scored) and len({s[first][0] for s in scored}) == 1:
            first += 1
        return [sum(lp for _, lp in s[first:] if lp is not None) for s in scored]
