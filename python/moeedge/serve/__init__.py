"""`moeedge serve`: an OpenAI-compatible HTTP server whose engine decodes concurrent
requests together (continuous batching over the runner's multi-sequence step).

- schemas.py: the requests' fields, validated, and the responses' shapes
- textstream.py: token ids to text pieces, with stop strings held back until decided
- engine.py: the engine thread that owns the model and schedules prefill and decode steps
- metrics.py: the Prometheus collector over the engine's figures
- app.py: the FastAPI application (routes, keys, body limit, OpenAI's error shape)
- cli.py: the subcommand, which loads the model and runs uvicorn
- static/: the one-page chat UI served at /
"""
