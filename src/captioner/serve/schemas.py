"""The OpenAPI descriptions of the routes that read their bodies themselves (POST /caption and
POST /v1/chat/completions), and /docs: the schema as one plain page (no CDN, works offline)."""

from __future__ import annotations

import html
from typing import Any

from pydantic import TypeAdapter

from captioner.decoding import (
    BOUNDS,
    MAX_AFFIX_CHARS,
    MAX_PROMPT_CHARS,
    MAX_WORDS,
    DecodingOptions,
    option_help,
)


def _decoding_schema() -> dict[str, Any]:
    """JSON schema of the decoding fields, derived from `DecodingOptions`: types and defaults
    from the dataclass, help texts and bounds from decoding.py."""
    properties = TypeAdapter(DecodingOptions).json_schema()["properties"]
    for name, prop in properties.items():
        prop["description"] = option_help(name)
        if name in BOUNDS:
            low, high, open_low = BOUNDS[name]
            prop["exclusiveMinimum" if open_low else "minimum"] = low
            prop["maximum"] = high
    if "prompt" in properties:
        properties["prompt"]["maxLength"] = MAX_PROMPT_CHARS
    for name in ("prefix", "suffix"):
        if name in properties:
            properties[name]["maxLength"] = MAX_AFFIX_CHARS
    for name in ("bad_words", "force_words"):
        if name in properties:
            properties[name]["maxItems"] = MAX_WORDS
    return properties


def caption_openapi() -> dict[str, Any]:
    decoding = _decoding_schema()
    binary = {"type": "string", "format": "binary"}
    stream = {"type": "boolean", "description": "one image: server-sent events as it is written"}
    url = {
        "type": "string",
        "description": "data: URL of an image, or an http(s) URL if the server fetches URLs",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": binary,
                            "files": {"type": "array", "items": binary},
                            **decoding,
                            "stream": stream,
                        },
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["url"],
                        "additionalProperties": False,
                        "properties": {"url": url, **decoding, "stream": stream},
                    }
                },
            },
        },
        "responses": {
            "401": {"description": "missing or wrong API key"},
            "403": {"description": "an http(s) URL, and this server does not fetch URLs"},
            "408": {"description": "the request body stalled or took too long"},
            "413": {"description": "upload or JSON body larger than the byte limit"},
            "415": {"description": "not an image, or an unsupported format"},
            "422": {"description": "too many pixels, broken image, or malformed request"},
            "503": {"description": "busy (queue or image memory full); see Retry-After"},
        },
    }


def chat_openapi() -> dict[str, Any]:
    part = {
        "type": "object",
        "description": 'a {"type": "text", "text": ...} or {"type": "image_url", "image_url": '
        '{"url": "data:image/...;base64,..."}} part',
    }
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": part}]},
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["model", "messages"],
                        "properties": {
                            "model": {"type": "string", "description": "GET /v1/models"},
                            "messages": {"type": "array", "items": message},
                            "max_tokens": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": BOUNDS["max_new_tokens"][1],
                            },
                            "temperature": {
                                "type": "number",
                                "minimum": 0,
                                "maximum": BOUNDS["temperature"][1],
                                "description": "0 or absent: greedy; > 0: sampled",
                            },
                            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                            "n": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": BOUNDS["num_beams"][1],
                            },
                            "stop": {"type": ["string", "array"]},
                            "stream": {"type": "boolean"},
                        },
                    }
                }
            },
        },
        "responses": {
            "400": {"description": "no image, two images, bad option"},
            "401": {"description": "missing or wrong API key (Authorization: Bearer)"},
            "403": {"description": "an http(s) image URL, and this server does not fetch URLs"},
            "404": {"description": "another model than the one served"},
            "413": {"description": "image or body larger than the byte limit"},
            "415": {"description": "not an image, or an unsupported format"},
            "422": {"description": "too many pixels, a broken image, or a body that is not JSON"},
            "503": {"description": "busy (queue or image memory full); see Retry-After"},
        },
    }


def docs_page(schema: dict[str, Any]) -> str:
    """The API as one plain HTML page, from the OpenAPI schema: each route, its request fields
    (type, bounds, help) and its answers. Nothing is fetched: it works offline."""
    e = html.escape
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(schema['info']['title'])} API</title><style>body{{font:15px/1.5 system-ui,"
        "sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left;"
        "vertical-align:top}code{background:#f3f3f3}</style></head><body>",
        f"<h1>{e(schema['info']['title'])} {e(str(schema['info'].get('version', '')))}</h1>",
        f"<p>{e(schema['info'].get('summary') or '')} The machine-readable schema is "
        "<a href='openapi.json'><code>/openapi.json</code></a>.</p>",
    ]
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            out.append(f"<h2><code>{e(method.upper())} {e(path)}</code></h2>")
            if op.get("summary") or op.get("description"):
                out.append(f"<p>{e(op.get('description') or op.get('summary'))}</p>")
            body = op.get("requestBody", {}).get("content", {})
            for ctype, content in body.items():
                props = content.get("schema", {}).get("properties", {})
                out.append(f"<h3>{e(ctype)}</h3>")
                if not props:
                    continue
                out.append("<table><tr><th>field</th><th>type</th><th>bounds</th><th>help</th>")
                for name, prop in props.items():
                    kind = prop.get("type") or ", ".join(
                        str(a.get("type")) for a in prop.get("anyOf", []) if isinstance(a, dict)
                    )
                    bounds = ", ".join(
                        f"{k} {prop[k]}"
                        for k in ("minimum", "exclusiveMinimum", "maximum", "maxLength", "maxItems")
                        if k in prop
                    )
                    out.append(
                        f"<tr><td><code>{e(name)}</code></td><td>{e(str(kind))}</td>"
                        f"<td>{e(bounds)}</td><td>{e(str(prop.get('description', '')))}</td></tr>"
                    )
                out.append("</table>")
            answers = op.get("responses", {})
            if answers:
                out.append("<ul>")
                out += [
                    f"<li><b>{e(str(code))}</b> {e(str(a.get('description', '')))}</li>"
                    for code, a in answers.items()
                ]
                out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)
