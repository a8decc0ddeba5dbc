"""Generated tokens' log-probabilities in the three shapes the APIs answer with.

The engine reports token ids (service/sampling.py: TokenLogprob); here they become text: /generate's own shape,
OpenAI chat's `logprobs.content` and OpenAI completions' parallel lists (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`). A token's text is that token decoded alone, as vLLM reports it; `bytes` is that
text's UTF-8 (a token holding part of a multi-byte character decodes to U+FFFD, as with vLLM).
"""
from __future__ import annotations

from typing import Any

from service.sampling import TokenLogprob


class TokenTexts:
    """Each token id's text, decoded once per server (ids repeat across requests)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self.tokenizer.decode([token])
        return text


def token_texts(request) -> TokenTexts:
    """The server's cache of token texts (on the app's state), made on first use."""
    st = request.app.state
    if getattr(st, "token_texts", None) is None:
        st.token_texts = TokenTexts(st.base.tokenizer)
    return st.token_texts


def native(entries: list[TokenLogprob | None], text: TokenTexts) -> list[dict[str, Any] | None]:
    return [
        None if e is None else
        {"token_id": e.token, "token": text(e.token), "logprob": e.logprob,
         "top_logprobs": [{"token_id": t, "token": text(t), "logprob": v} for t, v in e.top]}
        for e in entries
    ]


def chat(entries: list[TokenLogprob], text: TokenTexts) -> dict[str, Any]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        s = text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries],
            "refusal": None}


def completion(entries: list[TokenLogprob], text: TokenTexts, offset: int = 0,
               prompt: list[int] | None = None, prompt_entries: list[TokenLogprob | None] | None = None) -> dict[str, Any]:
    """`offset`: where the first entry's text starts in the completion (a stream's chunks go on from the last).
    With `prompt` (echo): the prompt's tokens first, from offset 0, with `prompt_entries` (None for the first)."""
    ids = list(prompt or []) + [e.token for e in entries]
    scored: list[TokenLogprob | None] = list(prompt_entries or [None] * len(prompt or [])) + list(entries)
    tokens = [text(t) for t in ids]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e.logprob for e in scored],
        "top_logprobs": [None if e is None else {text(t): v for t, v in e.top} for e in scored],
        "text_offset": offsets,
    }
