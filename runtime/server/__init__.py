"""The appliance's HTTP layer (aiohttp): OpenAI-compatible chat, uploads, metrics and the web page.

`create_app(config, engine)` builds the application; `serve(config, engine)` runs it.
"""
from runtime.server.app import create_app, serve

__all__ = ["create_app", "serve"]
