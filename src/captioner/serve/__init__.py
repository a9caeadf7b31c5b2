"""`captioner serve`: an HTTP captioning API with dynamic batching and one static page.

Needs the `[serve]` extra (fastapi, uvicorn, python-multipart, httpx). `ServerSettings`
(`captioner.serve.settings`) imports none of them, so the CLI can build `--help` from it.
"""

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:  # create_app imports FastAPI: only when asked for
    if name == "create_app":
        from captioner.serve.app import create_app

        return create_app
    if name == "ServerSettings":
        from captioner.serve.settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
