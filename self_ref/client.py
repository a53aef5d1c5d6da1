"""An OpenAI-compatible client for judge and policy servers (lmdeploy, vLLM, any other).

* Several base URLs (one server per GPU, as in the seed system): requests go round-robin to the
  servers that are up; a server that fails to connect or answers 5xx is benched for a cool-down
  and the request moves on to the next one.
* Retries with exponential backoff (and jitter) on time-outs, dropped connections, 5xx / 429 and
  bodies that are not the JSON of a completion. Other 4xx are the caller's mistake: no retry.
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
import logging
import os
import random
import time
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class RequestFailed(RuntimeError):
    """A request that failed for good (after retries, or a non-retryable 4xx)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class _Server:
    base_url: str
    down_until: float = 0.0
    failures: int = 0


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    failures: dict[str, int] = field(default_factory=dict)

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
    ):
        urls = [u.strip().rstrip("/") for u in (base_urls.split(",") if isinstance(base_urls, str) else base_urls) if u.strip()]
        if not urls:
            raise ValueError("no judge base URL given (--base_url)")
        self.servers = [_Server(u) for u in urls]
        self.model = model
        self.max_retries = max_retries
        self.cooldown = cooldown
        self.backoff = backoff
        self.stats = ClientStats()
        self.supports_scoring: bool | None = None  # learned on first use
        self.supports_token_scoring: bool | None = None  # /tokenize + logprob_token_ids (vLLM >= 0.32)
        self._label_ids: dict[tuple[str, tuple[str, ...]], list[int] | None] = {}
        self._next = 0
        self._rng = random.Random(seed)
        self._limit = asyncio.Semaphore(concurrency)
        key = os.environ.get(api_key_env) or "EMPTY"
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), headers={"Authorization": f"Bearer {key}"},
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

    async def post(self, path: str, payload: dict) -> dict:
        """POST ``payload`` (with ``model`` filled in) to one of the servers, retrying; the
        answer must be a completion (with ``choices``)."""
        return await self.request("POST", path, {"model": self.model, **payload}, need_choices=True)

    async def get(self, path: str) -> dict:
        return await self.request("GET", path, None, need_choices=False)

    async def request(self, method: str, path: str, payload: dict | None, need_choices: bool,
                      root: bool = False) -> dict:
        """One request to one of the servers, retrying what a retry can fix. ``root``: ``path``
        is under the server's root, not its ``/v1`` API (vLLM's ``/tokenize``)."""
        last_error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                delay = min(self.backoff * 2 ** (attempt - 1), 30.0) * (0.5 + self._rng.random())
                await asyncio.sleep(delay)
            server = self._pick_server()
            wait = server.down_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.stats.requests += 1
            try:
                url = (server.base_url.removesuffix("/v1") if root else server.base_url) + path
                async with self._limit:
                    response = await self._http.request(method, url, json=payload)
            except httpx.TimeoutException:
                self.stats.count("timeout")
                last_error = f"timeout from {server.base_url}"
                continue
            except httpx.TransportError as e:  # refused, reset, dropped mid-body
                self.stats.count("connection")
                self._bench(server, type(e).__name__)
                last_error = f"{type(e).__name__} from {server.base_url}"
                continue
            if response.status_code in RETRYABLE_STATUS:
                self.stats.count(f"http_{response.status_code}")
                if response.status_code >= 500:
                    self._bench(server, f"HTTP {response.status_code}")
                last_error = f"HTTP {response.status_code} from {server.base_url}"
                continue
            if response.status_code >= 400:
                raise RequestFailed(
                    f"HTTP {response.status_code} from {server.base_url}{path}: {response.text[:300]}",
                    status=response.status_code,
                )
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
                                                                "add_special_tokens": False}, need_choices=False, root=True)
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
                if e.status in (400, 404, 405, 422):  # no /tokenize here
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
        try:
            body = await self.post("/chat/completions", payload)
        except RequestFailed as e:
            if self.supports_token_scoring is None and e.status in (400, 422):
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
            try:
                body = await self.post("/chat/completions", payload)
            except RequestFailed as e:
                if self.supports_scoring is None and e.status in (400, 422):
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
