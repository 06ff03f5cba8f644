"""`looplm serve`: an OpenAI-compatible HTTP server over an Engine (needs the `serve` extra).

`create_app(engine, ...)` builds the FastAPI app; `python -m looplm serve` runs it on uvicorn.
"""
