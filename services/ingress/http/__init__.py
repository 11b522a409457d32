"""The ingress's OpenAI-compatible HTTP endpoint (Starlette on uvicorn, in the ingress's own
event loop): `server.py` (routes, keys, the server), `openai_requests.py` (request bodies into
the ingress's GenerateRequest), `openai_responses.py` (replies into OpenAI's bodies and SSE
chunks)."""
