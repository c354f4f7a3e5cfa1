"""Request bodies of the OpenAI-shaped routes, validated with strict types and ranges.

Unknown fields are accepted and ignored (OpenAI clients send ``user``, ``logprobs``, penalties...);
known fields must have the right type (``"5"`` is not an integer) and lie in range.
"""

from __future__ import annotations

from typing import Literal

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


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Body):
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] = Field(..., description="a string or a list of strings")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        return prompts


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)


class ImageRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    class_label: StrictInt | None = Field(None, ge=0)
    n: StrictInt = Field(1, ge=1, le=64)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    guidance_scale: StrictFloat | StrictInt | None = Field(None, ge=0.0, le=30.0)
    response_format: Literal["b64_json"] = "b64_json"
    size: StrictStr | None = None
