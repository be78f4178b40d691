"""`slmforge serve`: an OpenAI-compatible HTTP server over the inference engine (docs/serving.md).

protocol.py: the wire format (requests, errors, chunks); app.py: the ASGI app (routes, auth, limits,
engine bridge); server.py: uvicorn on a bound socket; command.py: the verb."""
