"""`smallcoder serve`: an OpenAI-compatible HTTP server over the continuous-batching `Engine`.

Endpoints: `/v1/completions` (raw prompts, FIM through `suffix`, `echo` + `logprobs` scoring as
lm-eval's `local-completions` sends it), `/v1/chat/completions` (the card's `User:/Assistant:`
format), llama.cpp's `/completion` and `/infill` (the editors': Continue, llama.vscode, Tabby),
`/v1/models` and `/health`. Streaming is
server-sent events whenever `stream` is true; every request becomes engine requests (generation
or scoring) that share one queue and one batch with everyone else's. A client that goes away
cancels its requests at once, every limit is checked before the engine sees a request, and a bad
request gets an OpenAI-style JSON error naming the field and the limit, never a crash.

Modules: `limits` (ServeLimits), `protocol` (request schemas with their bounds, errors),
`bridge` (engine <-> asyncio), `server` (what the endpoints share), `completions`, `chat`,
`native` (one per API family), `fim` (FIM prompts: order, extra context, the cut), `clients` (a
client's newer request replacing its stale one), `responses` (JSON/SSE shaping), `connections` (header timeouts,
per-client connection limits), `app` (FastAPI wiring, uvicorn config), `cli` (the command; it
imports none of pydantic, FastAPI or torch until the server starts).
"""
