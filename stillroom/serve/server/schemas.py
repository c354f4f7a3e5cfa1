"""Request bodies of the OpenAI-shaped routes, validated with strict types and ranges.

Known fields must have the right type (``"5"`` is not an integer) and lie in range. OpenAI
parameters this server cannot honour (tool calling, a ``response_format`` other than text, image
content parts) are refused with a 400 naming the parameter, never silently ignored; fields OpenAI
does not define are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

MAX_N = 8
MAX_PROMPTS = 16


MAX_LOGPROBS = 20
TOOLS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: StrictFloat | StrictInt = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | StrictInt = Field(0.0, ge=-2.0, le=2.0)
    user: StrictStr | None = None
    # refused: accepted as fields only so that sending them is a 400 naming them
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    logit_bias: Any = None
    response_format: Any = None

    @field_validator(*TOOLS)
    @classmethod
    def _no_tools(cls, value):
        if value is not None:
            raise ValueError("tool and function calling are not supported by this server")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value != {"type": "text"}:
            raise ValueError('only {"type": "text"} is supported (no JSON mode or schemas)')
        return value

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] = Field(..., description="a string or a list of strings")
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description="the top-k logprobs of each token")
    echo: StrictBool = False

    @property
    def logprob_count(self) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs)."""
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        return prompts


class TextPart(_Body):
    type: Literal["text", "image_url", "input_audio", "file", "refusal"]
    text: StrictStr | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[TextPart]

    @field_validator("content")
    @classmethod
    def _text(cls, value):
        """Content-part arrays become their text parts joined by newlines; other parts are refused."""
        if isinstance(value, str):
            return value
        other = sorted({part.type for part in value if part.type != "text"})
        if other:
            raise ValueError(
                f"content parts of type {', '.join(other)} are not supported: this model reads text"
            )
        if any(part.text is None for part in value):
            raise ValueError("a text content part needs 'text'")
        return "\n".join(part.text for part in value)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def logprob_count(self) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name), else the deprecated ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class ImageRequest(_Body):
    """OpenAI's image request. ``output_format`` is OpenAI's field: ``png`` (default) and ``webp``
    (lossless: the same pixels) of its values (not ``jpeg``), and ``raw``, a stillroom extension: the
    uint8 pixels, row-major [height, width, channels], with ``size`` ("WxH") and ``channels`` added
    to the response to read them back. Whichever the format, it travels base64-encoded in
    ``b64_json``.
    """

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    class_label: StrictInt | None = Field(None, ge=0)
    n: StrictInt = Field(1, ge=1, le=64)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    guidance_scale: StrictFloat | StrictInt | None = Field(None, ge=0.0, le=30.0)
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png", "webp", "raw"] = "png"
    size: StrictStr | None = None
