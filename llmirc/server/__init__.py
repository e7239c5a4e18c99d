"""`llmirc serve`: an HTTP server speaking vLLM's OpenAI-compatible API and SGLang's native API.

    app.py          the FastAPI app: engine bridge, auth, errors, /health, /metrics, /v1/models
    openai_api.py   /v1/completions, /v1/chat/completions (vLLM's request and response shapes)
    sglang_api.py   /generate, /get_model_info, /health_generate, /flush_cache (SGLang's native API)

Needs the `serve` extra (FastAPI, uvicorn, jinja2).
"""
