"""POST /tokenize and POST /detokenize (as vLLM serves them): the base model's token ids for a prompt, and back.

Clients need token ids for logit_bias and stop_token_ids, and prompt lengths against the context limit; a prompt
is tokenized exactly as /generate would feed it to the model (as one chat turn, unless raw; or chat messages).
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from service.auth import TenantCaller
from service.errors import not_ready
from service.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter(tags=["generation"])


def _engine(request: Request):
    engine = request.app.state.engine
    if engine is None:
        raise not_ready()
    return engine


@router.post("/tokenize", response_model=TokenizeResponse, summary="The token ids /generate would feed the model")
async def tokenize(request: Request, body: TokenizeRequest, caller: TenantCaller) -> TokenizeResponse:
    engine = _engine(request)
    ids = await run_in_threadpool(engine.encode_prompt, body.prompt, body.chat(), body.raw)
    strs = [engine.tokenizer.convert_ids_to_tokens(i) for i in ids] if body.return_token_strs else None
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.config.max_seq_len, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, summary="The text of token ids")
async def detokenize(request: Request, body: DetokenizeRequest, caller: TenantCaller) -> DetokenizeResponse:
    engine = _engine(request)
    engine.check_token_ids("the tokens", body.tokens)  # InvalidRequest: 400 invalid_request, as for prompts
    text = await run_in_threadpool(engine.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)
