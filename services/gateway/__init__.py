"""The gateway service: OpenAI-compatible HTTP front that tokenizes, routes to workers over gRPC
and streams tokens back as SSE. Imports no torch.

Entry points: `build_app(config)` (the FastAPI app), `run_gateway(args)` (the CLI).
"""
