"""The node's local HTTP API and web console (docs/http.md).

Only ``config``, ``service`` and ``history`` are imported by the agent core; FastAPI, uvicorn and prometheus_client
are imported on the server's own thread when ``[http] enabled`` is true, so an agent without HTTP starts as fast as
before.
"""
