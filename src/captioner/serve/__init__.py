"""`captioner serve`: an HTTP captioning API with dynamic batching and one static page.

Needs the `[serve]` extra (fastapi, uvicorn, python-multipart, httpx).
"""

from captioner.serve.app import create_app

__all__ = ["create_app"]
