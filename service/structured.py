"""Structured output: generations held to a JSON schema, any JSON object, a regular expression or a list of choices.

Each constrained request carries a grammar matcher (llguidance, the library vLLM uses for the same): before each
step it gives the tokens that keep the output inside the grammar, the sampler masks every other token, and the
chosen token advances the matcher. When the grammar is complete the matcher allows only EOS, so the request ends
with finish_reason "stop"; a request cut by max_tokens ends with "length" and an incomplete text, as in vLLM.

JSON is generated without optional whitespace (no newlines or indentation between tokens the model could spend its
whole budget on); a schema may set llguidance's own "x-guidance" options to change that.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy  # not llguidance.torch: its import scripts a TorchScript kernel svdserve does not use
import torch

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or choice list larger than this is refused


class GrammarError(ValueError):
    """The constraint does not compile (bad schema, regex or grammar); the message says where."""


@dataclass(frozen=True)
class Constraint:
    """What a request asked its output to follow: kind is json_schema, json_object, regex, choice or lark (a
    grammar of the server's own: tool calls); param is the request field that asked (named in errors)."""

    kind: str
    spec: Any = None
    param: str = "response_format"

    def grammar(self) -> str:
        """llguidance's grammar for this constraint (not yet checked against a tokenizer)."""
        if self.kind == "json_object":
            return _json_grammar({"type": "object"})
        if self.kind == "json_schema":
            if not isinstance(self.spec, dict):
                raise GrammarError("a JSON schema must be a JSON object")
            return _json_grammar(self.spec)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "lark":  # a grammar svdserve writes itself (service/tool_calls.py)
            return llguidance.LLMatcher.grammar_from_lark(self.spec)
        if self.kind == "choice":
            if not self.spec or not all(isinstance(c, str) and c for c in self.spec):
                raise GrammarError("choices must be a non-empty list of non-empty strings")
            return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.spec))
        raise GrammarError(f"unknown constraint kind {self.kind!r}")


def _json_grammar(schema: dict) -> str:
    schema = dict(schema)
    schema.setdefault("x-guidance", {"whitespace_flexible": False})
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))


class Grammars:
    """Compiles constraints against one tokenizer (built once: ~0.5 s for a 49k vocabulary) into matchers."""

    def __init__(self, hf_tokenizer, vocab_size: int) -> None:
        self._hf, self.vocab_size = hf_tokenizer, vocab_size
        self._tok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tok is None:
                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            return self._tok

    def compile(self, constraint: Constraint) -> str:
        """The checked grammar; GrammarError with the library's reason if it does not compile."""
        if len(json.dumps(constraint.spec)) > MAX_SPEC_CHARS:
            raise GrammarError(f"the {constraint.kind} constraint is over {MAX_SPEC_CHARS} characters")
        try:
            grammar = constraint.grammar()
        except GrammarError:
            raise
        except Exception as exc:  # the library's parse errors (bad regex, …)
            raise GrammarError(str(exc)) from exc
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer())
        if error:
            raise GrammarError(error)
        return grammar

    def matcher(self, grammar: str) -> "Matcher":
        return Matcher(llguidance.LLMatcher(self._tokenizer(), grammar))


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, m: llguidance.LLMatcher) -> None:
        self._m = m

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """The tokens the grammar allows next, packed: int32 words, bit j of word w for token 32·w + j (the
        sampler unpacks every constrained row's words at once: `sampling.unpack_bitmask`)."""
        bits = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        try:
            llguidance.numpy.fill_next_token_bitmask(self._m, bits, 0)
        except Exception:  # a matcher in error: no mask here; the next `advance` fails this request alone
            bits[:] = -1
        return torch.from_numpy(bits[0])

    def advance(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise GrammarError(f"token {token} does not follow the grammar: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """Nothing but the end can follow."""
        return self._m.is_stopped()


async def grammar_for(grammars: Grammars, constraint: Constraint | None) -> str | None:
    """The compiled grammar of a request's constraint (off the event loop: a large schema takes a while), or None;
    a constraint that does not compile is the caller's 400."""
    if constraint is None:
        return None
    from fastapi.concurrency import run_in_threadpool

    from service.errors import ApiError

    try:
        return await run_in_threadpool(grammars.compile, constraint)
    except GrammarError as exc:
        raise ApiError(400, "invalid_output_constraint",
                       f"{constraint.param}: the {constraint.kind} constraint does not compile: {exc}",
                       param=constraint.param) from None
