"""Request and response bodies of the HTTP API (pydantic 2). Every 4xx/5xx body is an ErrorResponse."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters_store.base import validate_id
from adapters_store.records import ID_PATTERN, AdapterRecord
from service.structured import Constraint
from svd_adapters.merge import MAX_SOURCES, SIGN_METHODS, STRATEGIES, MergeOptions

# Hard ceilings independent of the server's settings; the engine enforces prompt + max_tokens ≤ max_seq_len.
MAX_TOKENS_CEILING = 1 << 16
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256
MAX_PREDICTION_CHARS = 64 * 1024  # a predicted output (its text) larger than this is refused
MAX_PRIORITY = 1 << 31


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable reason, e.g. adapter_not_found, fingerprint_mismatch")
    message: str = Field(description="what went wrong and how to fix it")


class ErrorResponse(BaseModel):
    """The one error shape of this API, for every 4xx and 5xx answer."""

    error: ErrorDetail


# --- generation ----------------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
MAX_STOP_TOKEN_IDS = 64


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the output must follow")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("give 'json_schema' exactly when type is 'json_schema'")
        return self


class PromptInput(BaseModel):
    """What the model reads: text (one user turn through the chat template, or as is when raw) or chat turns; shared
    by /generate and /tokenize, so /tokenize answers the ids /generate feeds the model."""

    prompt: str | None = Field(
        default=None, description="text, sent as one user turn through the chat template (tokenized as is when raw)"
    )
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="chat turns; the base model's chat template is applied"
    )
    raw: bool = Field(default=False, description="tokenize 'prompt' as is, without the chat template")

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> "PromptInput":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (chat turns)")
        if self.raw and self.prompt is None:
            raise ValueError("'raw' applies to 'prompt' only; 'messages' always use the chat template")
        return self

    def chat(self) -> list[dict[str, Any]] | None:
        """The chat turns as the engine's encode_prompt takes them, or None for a prompt."""
        return [m.model_dump() for m in self.messages] if self.messages is not None else None


class SamplingControls(BaseModel):
    """Sampling parameters beyond temperature / top_p, shared by /generate and the OpenAI-compatible API
    (OpenAI's penalties and logit_bias; top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos and
    min_tokens as vLLM takes them)."""

    top_k: int | None = Field(default=None, ge=-1, description="sample among the k most likely tokens; 0 or -1 = off")
    priority: int | None = Field(
        default=None, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
        description="admission order, as vLLM's: lower first (default 0); waiting requests of a lower value are "
        "admitted before any of a higher one, a full queue refuses the highest value's newest request first, and "
        "with every row taken a running request of a higher value is preempted (it resumes later, its output unchanged)",
    )
    min_p: float | None = Field(
        default=None, ge=0.0, le=1.0, description="drop tokens below min_p × the most likely token's probability"
    )
    presence_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, description="subtracted from the logit of every token already generated"
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, description="subtracted from a token's logit once per time it was generated"
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0.0, le=10.0,
        description="> 1 discourages tokens of the prompt and the output (positive logits divided, negative multiplied)",
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (as a string key) → bias in [-100, 100] added to its logit"
    )
    stop_token_ids: list[int] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS, description="token ids that end the generation, as EOS does"
    )
    ignore_eos: bool | None = Field(default=None, description="keep generating past EOS, up to max_tokens")
    min_tokens: int | None = Field(
        default=None, ge=0, description="EOS and stop_token_ids cannot end the generation before this many tokens"
    )

    cache_salt: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="vLLM's: only requests with the same salt (and tenant) reuse each other's cached prompt prefixes",
    )

    response_format: ResponseFormat | None = Field(
        default=None, description="OpenAI's: {type: json_object} or {type: json_schema, json_schema: {schema}}"
    )
    guided_json: dict[str, Any] | None = Field(default=None, description="vLLM's: a JSON schema the output follows")
    guided_regex: str | None = Field(default=None, description="vLLM's: a regular expression the output matches")
    guided_choice: list[str] | None = Field(
        default=None, min_length=1, description="vLLM's: the output is exactly one of these strings"
    )

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(v)}")
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (non-negative integers as strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values are in [-100, 100], got {bias} for token {key}")
        return v

    @model_validator(mode="after")
    def _one_constraint(self) -> "SamplingControls":
        given = [n for n in ("guided_json", "guided_regex", "guided_choice") if getattr(self, n) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint, got {', '.join(given)}")
        return self

    def constraint(self) -> Constraint | None:
        """The structured-output constraint asked for, if any."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return Constraint("json_object")
        if rf is not None and rf.type == "json_schema":
            return Constraint("json_schema", rf.json_schema.schema_)
        if self.guided_json is not None:
            return Constraint("json_schema", self.guided_json, "guided_json")
        if self.guided_regex is not None:
            return Constraint("regex", self.guided_regex, "guided_regex")
        if self.guided_choice is not None:
            return Constraint("choice", list(self.guided_choice), "guided_choice")
        return None

    def prefix_scope(self, tenant: str | None) -> str | None:
        """Who may reuse this request's cached prompt prefixes (SamplingParams.prefix_scope): its tenant's
        requests with the same cache_salt. Across tenants, a prefix served from the cache would tell one tenant
        (by usage.cached_tokens or a faster first token) what another sent; adapters are their owner's alone,
        but the base model is everyone's."""
        if tenant is None and self.cache_salt is None:
            return None
        return f"{tenant or ''}\x00{self.cache_salt or ''}"

    def sampling_controls(self) -> dict[str, Any]:
        """Keyword arguments for SamplingParams (defaults where unset)."""
        return {
            "top_k": max(0, self.top_k or 0),
            "min_p": self.min_p or 0.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "logit_bias": {int(k): float(b) for k, b in (self.logit_bias or {}).items()},
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": bool(self.ignore_eos),
            "min_tokens": self.min_tokens or 0,
            "priority": self.priority or 0,
        }


class MergedAdapters(BaseModel):
    """Several of the caller's adapters merged into one for this request (LoRAX's merged_adapters). The merge is
    cached like an adapter: the same ids, weights and strategy reuse it."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=1, max_length=MAX_SOURCES, description="the adapters to merge, each once")
    weights: list[float] | None = Field(
        default=None, description="one weight per adapter (default 1 each; negative subtracts an adapter's change)"
    )
    merge_strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        default="linear",
        description="linear: exactly Σ wᵢ ΔWᵢ, any methods and ranks; ties / dare_linear / dare_ties: entry by entry "
        "on each adapter's parameter change (all adapters one method at one rank)",
    )
    density: float = Field(default=1.0, gt=0.0, le=1.0, description="ties / dare: the fraction of each change kept")
    majority_sign_method: Literal[SIGN_METHODS] = Field(  # type: ignore[valid-type]
        default="total", description="ties / dare_ties: elect each entry's sign by its summed change or by count"
    )

    @field_validator("ids")
    @classmethod
    def _check_ids(cls, v: list[str]) -> list[str]:
        for adapter_id in v:
            validate_id(adapter_id)
        if len(set(v)) != len(v):
            raise ValueError("list each adapter once (its weight scales it)")
        return v

    @model_validator(mode="after")
    def _check_weights(self) -> "MergedAdapters":
        if self.weights is not None:
            if len(self.weights) != len(self.ids):
                raise ValueError(f"weights: {len(self.weights)} given for {len(self.ids)} ids; give one per adapter")
            if any(not math.isfinite(w) or abs(w) > 100.0 for w in self.weights):
                raise ValueError("weights must be finite numbers in [-100, 100]")
        return self

    def resolved_weights(self) -> tuple[float, ...]:
        return tuple(self.weights) if self.weights is not None else (1.0,) * len(self.ids)

    def options(self) -> MergeOptions:
        return MergeOptions(self.merge_strategy, self.density, self.majority_sign_method)


class GenerateRequest(PromptInput, SamplingControls):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"adapter_id": "ad-0123456789ab", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32},
                {"adapter_id": None, "prompt": "The capital of France is", "max_tokens": 8},
                {"merged_adapters": {"ids": ["ad-0123456789ab", "ad-ba9876543210"], "weights": [1.0, 0.5]},
                 "prompt": "Summarise our refund policy.", "max_tokens": 64},
            ]
        },
    )

    adapter_id: str | None = Field(
        default=None, pattern=ID_PATTERN, description="an uploaded adapter's id; null serves the base model"
    )
    merged_adapters: MergedAdapters | None = Field(
        default=None, description="instead of adapter_id: several adapters merged into one for this request"
    )
    max_tokens: int = Field(default=64, ge=1, le=MAX_TOKENS_CEILING, description="most tokens to generate")
    prediction: str | None = Field(
        default=None, max_length=MAX_PREDICTION_CHARS,
        description="the answer's expected text (OpenAI's Predicted Outputs: e.g. a file being edited): drafted and "
                    "verified by speculative decoding, so an answer that repeats it comes sooner; the answer is the same")
    temperature: float = Field(default=0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=1 << 63, description="makes sampling reproducible")
    stop: str | list[str] | None = Field(default=None, description="stop sequence(s); not included in the text")
    logprobs: int | None = Field(
        default=None, ge=0, le=20,
        description="report each generated token's log-probability under the model and this many most likely "
        "alternatives (0–20); null = none",
    )
    prompt_logprobs: int | None = Field(
        default=None, ge=0, le=20,
        description="also report each prompt token's log-probability given the tokens before it (the first: null), "
        "with this many alternatives (0–20): a prompt's likelihood under the adapter",
    )
    stream: bool = Field(
        default=False,
        description="answer as server-sent events: 'delta' events {\"text\": …, \"logprobs\": [...] when asked} as "
        "tokens arrive, then one 'done' "
        "event with the whole GenerateResponse (or an 'error' event {\"error\": {code, message}})",
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for s in items:
            if not s:
                raise ValueError("stop sequences must be non-empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @model_validator(mode="after")
    def _one_adapter(self) -> "GenerateRequest":
        if self.adapter_id is not None and self.merged_adapters is not None:
            raise ValueError("give adapter_id or merged_adapters, not both")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = Field(0, description="prompt tokens taken from the prefix cache (an earlier prompt on the same "
                                              "adapter started with them), not computed again")
    accepted_prediction_tokens: int = Field(0, description="with a prediction: its tokens drafted and kept")
    rejected_prediction_tokens: int = Field(0, description="with a prediction: its tokens drafted and not kept")


class TokenAlternative(BaseModel):
    token_id: int
    token: str = Field(description="the token decoded alone")
    logprob: float = Field(description="natural log of its probability under the model (before temperature etc.)")


class TokenLogprobInfo(TokenAlternative):
    top_logprobs: list[TokenAlternative] = Field(description="the most likely tokens at this position, most likely first")


class GenerateResponse(BaseModel):
    text: str
    adapter_id: str | None = Field(description="the adapter used; merge:<id>,<id>,… for merged_adapters; null: the base")
    finish_reason: Literal["stop", "length"]
    usage: Usage
    logprobs: list[TokenLogprobInfo] | None = Field(
        default=None, description="one entry per generated token, when the request set 'logprobs'"
    )
    prompt_logprobs: list[TokenLogprobInfo | None] | None = Field(
        default=None, description="one entry per prompt token (null for the first), when the request set 'prompt_logprobs'"
    )


class TokenizeRequest(PromptInput):
    model_config = ConfigDict(extra="forbid")

    return_token_strs: bool = Field(default=False, description="also answer each token as the tokenizer spells it")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="this server's context limit (prompt + generated tokens)")
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[int] = Field(max_length=MAX_TOKENS_CEILING, description="token ids of the base model's vocabulary")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the tokens' text (special tokens included)")


# --- adapters ------------------------------------------------------------------------------------------------


class AdapterCreated(BaseModel):
    """201 answer to an upload: the adapter is validated and durably stored."""

    adapter_id: str
    method: str
    rank: int
    trainable_params: int
    size_bytes: int


class PinState(BaseModel):
    adapter_id: str
    pinned: bool = Field(description="kept in a device slot of this replica, never evicted (loaded now if it was not)")


class AdapterInfo(BaseModel):
    adapter_id: str
    method: str
    rank: int
    alpha: float
    trainable_params: int
    size_bytes: int
    base_model: str
    created_at: float = Field(description="Unix time of the upload")

    @classmethod
    def from_record(cls, record: AdapterRecord) -> "AdapterInfo":
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    count: int


# --- health --------------------------------------------------------------------------------------------------


class StoreHealth(BaseModel):
    backend: Literal["disk", "redis"]
    location: str = Field(description="directory, or Redis URL without credentials")
    ok: bool


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"] = Field(description="degraded: the store is unreachable (cached adapters and the base still serve)")
    base_model: str
    factors_fingerprint: str
    device: str
    dtype: str = Field(description="serving dtype of the base weights and adapter slots")
    store: StoreHealth
    adapters_cached: int | None = Field(description="adapters resident in the engine's device cache")
    max_rank: int
    max_seq_len: int
    engine: dict[str, Any] = Field(default_factory=dict, description="the engine's own statistics")
