"""LLM backends that turn reports into verified labels: an OpenAI-compatible server, or transformers in-process.

Both give every input item exactly one LabelOutcome: "labelled" once an answer passes `parse_and_verify`, or
"queued" (for manual review) with a one-line error after `attempts` tries. `on_result` fires as each report
finishes, so the caller can persist progress and a killed run resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from appliance.errors import ConfigError
from appliance.labels.prompt import build_messages, json_schema
from appliance.labels.verify import AnswerError, normalise_text, parse_and_verify

Status = Literal["labelled", "queued"]
ResultCallback = Callable[["LabelOutcome"], None]

# A retry after a bad answer samples a little: greedy decoding would give the same bad answer again.
RETRY_TEMPERATURE = 0.3
_CONNECTIONS_PER_CLIENT = 16


@dataclass
class LabelOutcome:
    """The result for one report."""

    report_id: str
    status: Status
    labels: dict[str, int] | None
    evidence: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    error: str | None = None  # one line, no report text
    model: str = ""


class _Retryable(Exception):
    """A failure worth another attempt (server busy or down, timeout, bad answer)."""

    def __init__(self, reason: str, retry_after_s: float | None = None, bad_answer: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.bad_answer = bad_answer


class _Final(Exception):
    """A failure that another attempt will not fix (e.g. HTTP 400 for this report): queue it now."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _StructuredUnsupported(Exception):
    """The server does not take response_format (or ignores it): switch to the csv protocol."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_detail(response, report_text: str) -> str:
    """The server's error message, unless it quotes the report (error lines must stay free of report text)."""
    try:
        body = response.json()
        message = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(message, dict):
            message = message.get("message") or message.get("detail") or json.dumps(message)
    except ValueError:
        message = response.text
    message = _one_line(str(message), 160)
    norm_message = normalise_text(message)
    for sentence in report_text.replace("\n", ".").split("."):
        sentence = normalise_text(sentence)
        if len(sentence) >= 12 and sentence in norm_message:
            return "(server message withheld: it quotes the report)"
    return message


def _chat_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    for suffix in ("/chat/completions", "/v1"):
        if base.endswith(suffix):
            base = base[: -len(suffix)].rstrip("/")
    return f"{base}/v1/chat/completions"


def _backoff_s(base_s: float, failed_attempts: int) -> float:
    # jitter is under 10 %, so each wait stays longer than the one before (x2 per attempt)
    return base_s * 2 ** (failed_attempts - 1) * (1 + random.uniform(0, 0.1))


def _run_sync(coro_factory):
    """asyncio.run, also from a thread whose loop is already running (e.g. inside an async flow)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    box: dict = {}

    def worker():
        try:
            box["value"] = asyncio.run(coro_factory())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=worker, name="label-llm")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class OpenAIBackend:
    """Labels reports through an OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama, ...)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        max_in_flight: int = 16,
        timeout_s: float = 60,
        attempts: int = 3,
        backoff_s: float = 1.0,
        structured: Literal["auto", "json_schema", "none"] = "auto",
        ask_evidence: bool = False,
        api_key: str | None = None,
        max_tokens: int | None = None,
    ):
        if structured not in ("auto", "json_schema", "none"):
            raise ConfigError(f"labels structured output must be auto, json_schema or none, not {structured!r}")
        if max_in_flight < 1 or attempts < 1:
            raise ConfigError("labels max_in_flight and attempts must be at least 1")
        self.url = _chat_url(base_url)
        self.model = model
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.structured = structured
        self.ask_evidence = ask_evidence
        self.api_key = api_key
        self.max_tokens = max_tokens
        # "auto" starts with json_schema and switches to csv for the rest of this instance's life
        self._use_json = structured in ("auto", "json_schema")

    @property
    def mode(self) -> str:
        """The answer format requests use now: "json" or "csv"."""
        return "json" if self._use_json else "csv"

    def _payload(self, report_text: str, vocabulary, mode: str, temperature: float) -> dict:
        payload = {
            "model": self.model,
            "messages": build_messages(report_text, vocabulary, mode=mode, ask_evidence=self.ask_evidence),
            "temperature": temperature,
            "max_tokens": self.max_tokens or self._default_max_tokens(vocabulary, mode),
        }
        if mode == "json":
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "labels", "schema": json_schema(vocabulary, self.ask_evidence), "strict": True},
            }
        return payload

    def _default_max_tokens(self, vocabulary, mode: str) -> int:
        n = len(vocabulary.findings)
        budget = 4 * n + 16 if mode == "csv" else 16 * n + 32
        return budget + (60 * n if self.ask_evidence else 0)

    async def _request_once(self, slots: asyncio.Queue, report_text: str, vocabulary, temperature: float):
        client = await slots.get()  # a free slot bounds the requests in flight
        try:
            # the format is read once a slot is free, so waiting requests see an "auto" fallback at once
            mode = self.mode
            payload = self._payload(report_text, vocabulary, mode, temperature)
            async with asyncio.timeout(self.timeout_s):
                response = await client.post(self.url, json=payload)
        except TimeoutError:
            raise _Retryable(f"no answer within {self.timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"cannot reach the LLM server ({type(exc).__name__})") from None
        finally:
            slots.put_nowait(client)

        status = response.status_code
        if status in (401, 403, 404):
            raise ConfigError(
                f"the LLM server at {self.url} answered HTTP {status} for model {self.model!r}: "
                f"{_server_detail(response, report_text)}"
            )
        if status == 429 or status == 408 or status >= 500:
            retry_after = response.headers.get("retry-after")
            try:
                retry_after_s = float(retry_after) if retry_after else None
            except ValueError:
                retry_after_s = None
            raise _Retryable(f"HTTP {status}: {_server_detail(response, report_text)}", retry_after_s)
        if status >= 400:
            detail = _server_detail(response, report_text)
            if mode == "json" and self.structured == "auto" and status in (400, 422) and (
                "response_format" in detail or "json_schema" in detail
            ):
                raise _StructuredUnsupported(detail)
            raise _Final(f"HTTP {status}: {detail}")
        try:
            body = response.json()
            choice = body["choices"][0]
            answer = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("the server's reply is not a chat completion") from None
        if mode == "json" and self.structured == "auto" and isinstance(answer, str) and "{" not in answer:
            raise _StructuredUnsupported("the server ignored response_format")
        try:
            labels, evidence = parse_and_verify(
                answer or "", vocabulary, mode, report_text, require_evidence=self.ask_evidence
            )
        except AnswerError as exc:
            cut = " (cut off at max_tokens)" if choice.get("finish_reason") == "length" else ""
            raise _Retryable(f"bad answer: {exc.reason}{cut}", bad_answer=True) from None
        return labels, evidence

    async def _label_one(self, slots: asyncio.Queue, report_id: str, report_text: str, vocabulary) -> LabelOutcome:
        error = None
        temperature = 0.0
        attempt = 0
        while attempt < self.attempts:
            attempt += 1
            try:
                labels, evidence = await self._request_once(slots, report_text, vocabulary, temperature)
                return LabelOutcome(report_id, "labelled", labels, evidence, attempt, None, self.model)
            except _StructuredUnsupported:
                # not this report's fault: switch the whole backend to csv and ask again without using an attempt
                self._use_json = False
                attempt -= 1
                continue
            except _Final as exc:
                error = exc.reason
                break
            except _Retryable as exc:
                error = exc.reason
                if exc.bad_answer:
                    temperature = RETRY_TEMPERATURE
                if attempt < self.attempts:
                    delay = _backoff_s(self.backoff_s, attempt)
                    if exc.retry_after_s is not None:
                        delay = max(delay, min(exc.retry_after_s, 60.0))
                    await asyncio.sleep(delay)
        return LabelOutcome(report_id, "queued", None, {}, attempt, _one_line(error or "unknown error"), self.model)

    async def alabel(self, items: list[tuple[str, str]], vocabulary,
                     on_result: ResultCallback | None = None) -> list[LabelOutcome]:
        """Label (report_id, report_text) items; outcomes come back in input order."""
        items = list(items)
        outcomes: list[LabelOutcome | None] = [None] * len(items)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        # httpx's own timeout is per socket operation; the whole-request deadline is asyncio.timeout above
        timeout = httpx.Timeout(self.timeout_s + 5, pool=None)
        # httpcore's pool bookkeeping grows with connections x requests (encode/httpx#3215): one pool of 64
        # connections ran at half the speed of 32. Several small clients, each with its own slots, avoid it.
        lane_sizes = [min(_CONNECTIONS_PER_CLIENT, self.max_in_flight - start)
                      for start in range(0, self.max_in_flight, _CONNECTIONS_PER_CLIENT)]
        slots: asyncio.Queue = asyncio.Queue()
        # a bounded window of tasks (not one per report) keeps memory flat for 100k-report runs; it is wider than
        # max_in_flight so reports sleeping in back-off don't leave the server idle
        window = 4 * self.max_in_flight
        async with contextlib.AsyncExitStack() as stack:
            for size in lane_sizes:
                limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
                client = await stack.enter_async_context(
                    httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout)
                )
                for _ in range(size):
                    slots.put_nowait(client)

            async def run(index: int, report_id: str, text: str):
                return index, await self._label_one(slots, report_id, text, vocabulary)

            pending: set[asyncio.Task] = set()
            feed = iter(enumerate(items))
            try:
                while True:
                    for index, (report_id, text) in feed:
                        pending.add(asyncio.create_task(run(index, report_id, text)))
                        if len(pending) >= window:
                            break
                    if not pending:
                        break
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        index, outcome = task.result()
                        outcomes[index] = outcome
                        if on_result is not None:
                            on_result(outcome)
            finally:
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
        return outcomes  # type: ignore[return-value]

    def label(self, items: list[tuple[str, str]], vocabulary,
              on_result: ResultCallback | None = None) -> list[LabelOutcome]:
        """Synchronous `alabel`."""
        return _run_sync(lambda: self.alabel(items, vocabulary, on_result))


class TransformersBackend:
    """Labels reports with a local causal LM folder through transformers (batched, greedy, csv protocol)."""

    mode = "csv"  # nothing constrains local decoding to a schema; csv is the shortest answer to get right

    def __init__(self, model_dir: Path, *, device: str = "auto", batch_size: int = 8, max_new_tokens: int = 256,
                 attempts: int = 3, ask_evidence: bool = False):
        self.model_dir = Path(model_dir)
        self.batch_size = max(1, batch_size)
        self.max_new_tokens = max_new_tokens
        self.attempts = max(1, attempts)
        self.ask_evidence = ask_evidence
        self.model_name = self.model_dir.name
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(
                f"LLM model folder {self.model_dir} is missing or has no config.json "
                "(copy the model there; the appliance never downloads one)"
            )
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ConfigError(f"the transformers backend needs the transformers package ({exc.name} is missing)")

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = torch.float32
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the LLM from {self.model_dir}: {_one_line(exc, 160)}") from None
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens must follow each prompt directly
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _prompt(self, report_text: str, vocabulary) -> str:
        messages = build_messages(report_text, vocabulary, mode=self.mode, ask_evidence=self.ask_evidence)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{messages[0]['content']}\n\n{messages[1]['content']}\n\nAnswer:\n"

    def _generate(self, prompts: list[str], sample: bool) -> list[str]:
        import torch

        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        options = {"do_sample": False}
        if sample:
            options = {"do_sample": True, "temperature": RETRY_TEMPERATURE, "top_p": 1.0}
        with torch.inference_mode():
            out = self.model.generate(
                **encoded,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **options,
            )
        new_tokens = out[:, encoded["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def label(self, items: list[tuple[str, str]], vocabulary,
              on_result: ResultCallback | None = None) -> list[LabelOutcome]:
        """Label (report_id, report_text) items in batches; outcomes come back in input order."""
        items = list(items)
        outcomes: list[LabelOutcome | None] = [None] * len(items)
        for start in range(0, len(items), self.batch_size):
            batch = list(range(start, min(start + self.batch_size, len(items))))
            errors: dict[int, str] = {}
            for attempt in range(1, self.attempts + 1):
                if not batch:
                    break
                prompts = [self._prompt(items[i][1], vocabulary) for i in batch]
                answers = self._generate(prompts, sample=attempt > 1)
                failed = []
                for i, answer in zip(batch, answers):
                    report_id, text = items[i]
                    try:
                        labels, evidence = parse_and_verify(
                            answer, vocabulary, self.mode, text, require_evidence=self.ask_evidence
                        )
                    except AnswerError as exc:
                        errors[i] = f"bad answer: {exc.reason}"
                        failed.append(i)
                        continue
                    outcomes[i] = LabelOutcome(report_id, "labelled", labels, evidence, attempt, None, self.model_name)
                    if on_result is not None:
                        on_result(outcomes[i])
                batch = failed
            for i in batch:
                outcomes[i] = LabelOutcome(
                    items[i][0], "queued", None, {}, self.attempts, _one_line(errors[i]), self.model_name
                )
                if on_result is not None:
                    on_result(outcomes[i])
        return outcomes  # type: ignore[return-value]
