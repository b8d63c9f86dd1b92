"""A generation request: its JSON schema (pydantic), the server's limits applied, and the options it gives
`lingmao.sampling.prepare`. Ranges the sampling code checks itself (temperature 0 or in [0.01, 100], top_p in
(0, 1], ...) are left to it, so the one-line reasons are the same as on the command line.

A new option is one more field here and the keyword of the same name in `lingmao.sampling.prepare`; every text
field (and list of texts) is refused if it holds a lone surrogate or a control character."""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from lingmao.errors import LingmaoError
from lingmao.sampling import text_problem
from lingmao.serve.limits import Limits

MULTILINE = {"prompt"}  # text fields that may hold line breaks

DEFAULT_NEW_TOKENS = 200


class GenerateRequest(BaseModel):
    """The body of `POST /api/generate` and `/api/generate/stream`; every field is optional."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = ""
    form: str | None = Field(None, max_length=16, description="wujue qijue wulv qilv (五绝 ...) or ci, null = free")
    tune: str | None = Field(None, max_length=32, description="a ci tune, e.g. 浣溪沙 (implies form=ci)")
    acrostic: str | None = Field(None, max_length=16, description="藏头: line i starts with character i")
    title: str | None = None
    author: str | None = Field(None, max_length=32, description="a poet the model was conditioned on")
    keywords: list[str] | None = Field(None, max_length=8, description="keywords of the header, e.g. [\"月\", \"霜\"]")
    enforce_keywords: bool = Field(False, description="each keyword appears in every sample, by construction")
    rhyme: str | None = Field(None, max_length=16, description="pingshui | modern | none")
    tones: str | None = Field(None, max_length=16, description="strict | lenient | off")
    pattern: str | None = Field("auto", max_length=16, description="auto | 平起 | 仄起")
    first_line_rhymes: bool | None = None
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = Field(None, description="free text only (null = 200 or the server's limit)")
    num_samples: int = 1
    seed: int | None = Field(None, ge=0, lt=2**63, description="null = a new one, returned with the result")

    @field_validator("*")
    @classmethod
    def valid_text(cls, value: Any, info: ValidationInfo) -> Any:
        for text in value if isinstance(value, list | tuple) else [value]:
            problem = text_problem(text, newlines=info.field_name in MULTILINE) if isinstance(text, str) else None
            if problem:
                raise ValueError(problem)
        return value


LISTED_BY = "GET /api/info lists them"


def check_tune(request: GenerateRequest) -> None:
    """The ci tune a request names, checked here so that the error points to the API's list, not the command
    line's (`list_tunes=true`)."""
    from lingmao.verse.forms import CI, normalize_form
    from lingmao.verse.tunes import tune_named

    if request.tune:
        tune_named(request.tune, LISTED_BY)
    elif normalize_form(request.form) == CI:
        raise LingmaoError(f"form=ci needs a tune, e.g. \"tune\": \"浣溪沙\" ({LISTED_BY})")


def generation_options(request: GenerateRequest, limits: Limits) -> dict[str, Any]:
    """Keyword arguments for `LingmaoModel.generate` (seed resolved); a request over a limit is a LingmaoError."""
    check_tune(request)
    for name in ("prompt", "title", "keywords"):
        text = "".join(request.keywords or []) if name == "keywords" else getattr(request, name) or ""
        if len(text) > limits.max_prompt_chars:
            raise LingmaoError(
                f"{name}: {len(text)} characters; this server takes at most {limits.max_prompt_chars} "
                "(limits.max_prompt_chars)"
            )
    new_tokens = request.max_new_tokens
    if new_tokens is None:
        new_tokens = min(DEFAULT_NEW_TOKENS, limits.max_new_tokens)
    elif new_tokens > limits.max_new_tokens:
        raise LingmaoError(
            f"max_new_tokens: {new_tokens} is over this server's limit of {limits.max_new_tokens} "
            "(limits.max_new_tokens)"
        )
    if request.num_samples > limits.max_samples:
        raise LingmaoError(
            f"num_samples: {request.num_samples} is over this server's limit of {limits.max_samples} "
            "(limits.max_samples)"
        )
    options = request.model_dump()
    options.update(
        max_new_tokens=new_tokens,
        seed=request.seed if request.seed is not None else random.SystemRandom().randrange(2**31),
    )
    return options
