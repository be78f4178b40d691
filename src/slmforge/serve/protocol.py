"""The OpenAI wire format `slmforge serve` speaks: request bodies (validated by pydantic), error bodies,
response objects and streamed chunks. No engine, no HTTP server: plain data in, plain dicts out.

Field meanings and defaults follow OpenAI's API reference (completions: max_tokens 16, temperature 1,
top_p 1; chat: no max_tokens, i.e. up to the context), so a client written for OpenAI behaves the same.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Fields of OpenAI's API this server cannot honour: a request that sets one (to anything but its
# neutral value) is refused naming it, rather than quietly answered as if it had not been asked.
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
}
MAX_STOP_STRINGS = 16
MAX_N = 16


class APIError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: what its clients parse into `openai.BadRequestError` and friends."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share. Unknown fields are ignored (clients add their own); the ones in
    UNSUPPORTED are refused by `refuse_unsupported`."""

    # strict: a number sent as a string ("max_tokens": "10") is a client's bug, refused as OpenAI's API does
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # not OpenAI's; vLLM's and llama.cpp's servers take it too
    repetition_penalty: float = Field(1.0, gt=0.0)  # likewise
    ignore_eos: bool = False  # vLLM's: generate past the end-of-sequence token (benchmarks, fixed lengths)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("temperature", "top_p", "repetition_penalty", "n", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):  # OpenAI's clients may send null for "the default"
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        return stops

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise APIError(400, f"{name} is not supported by slmforge serve", param=name,
                               code="unsupported_parameter")

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    # A text, several texts, token ids, or several lists of token ids (as OpenAI's API takes them).
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "prompt: empty list", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template as given

    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]: the parts joined
            content = "".join(part.text for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line and the parameter it names, for pydantic's errors about a request body."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})", None
    # A union's errors name each alternative (`prompt.str`, `prompt.list[int]`): name the field alone.
    param = ".".join(p for p in location if not (p[:1].isalpha() and ("[" in p or p in {"str", "int"})))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        return f"{param}: required field missing", param or None
    return f"{param}: {message}" if param else message, param or None


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
               for i, (text, reason) in enumerate(zip(texts, finish_reasons))]
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_completion(id: str, model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, finish_reasons))]
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


class ChunkWriter:
    """The server-sent events of one streamed response, in OpenAI's chunk format: one `data:` line of
    JSON per event, a blank line after each, `data: [DONE]` at the end."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                    "choices": choices, **extra})

    def start(self, index: int) -> str | None:
        """The opening chunk of choice `index` (chat only: the assistant's role, as OpenAI sends it)."""
        if not self.chat:
            return None
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def text(self, index: int, text: str) -> str:
        if self.chat:
            return self._chunk([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
        return self._chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])

    def finish(self, index: int, reason: str) -> str:
        if self.chat:
            return self._chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        return self._chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": reason}])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens))

    @staticmethod
    def error(error: APIError) -> str:
        """An error after the stream began (the status line is already sent): OpenAI's clients raise it."""
        return sse(error.body())

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
