"""Which media a server started by ``sparsemm serve`` may load: inline data always; local files and remote URLs
only where the operator allowed them (``--allow-local-media DIR``, ``--allow-media-urls DOMAINS``).

SGLang itself opens any local path a client names in ``image_data`` (and ``file://`` URLs), and fetches any URL;
its ``--allowed-media-domains`` cannot stop that (empty means every domain, local paths are never checked). A server
we start for people must not be open that way, so the policy travels to SGLang's processes in ``MEDIA_ENV`` and the
plugin checks every media item of every request before SGLang reads it (``check_request_media``), and again where
SGLang reads image bytes (``MediaPolicy.check``). No SGLang import here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from sparsemm.serving.sglang import MEDIA_ENV, FromEnv

MEDIA_FIELDS = ("image_data", "video_data", "audio_data")


@dataclass(frozen=True)
class MediaPolicy:
    """Folders whose files may be loaded, and URL host names that may be fetched (exact names)."""

    local_dirs: tuple[str, ...] = ()
    url_domains: tuple[str, ...] = ()

    @classmethod
    def allowing(cls, local_dirs: list[str] | tuple[str, ...] = (), url_domains: str | None = None) -> MediaPolicy:
        """The policy from ``sparsemm serve``'s flags: folders made absolute, domains from a comma list."""
        dirs = tuple(os.path.realpath(os.path.expanduser(d)) for d in local_dirs)
        domains = tuple(sorted({d.strip().lower().rstrip(".") for d in (url_domains or "").split(",") if d.strip()}))
        return cls(dirs, domains)

    def to_json(self) -> str:
        return json.dumps({"local_dirs": list(self.local_dirs), "url_domains": list(self.url_domains)})

    @classmethod
    def from_json(cls, text: str) -> MediaPolicy:
        data = json.loads(text)
        return cls(tuple(data.get("local_dirs", ())), tuple(data.get("url_domains", ())))

    def check(self, item: Any, field: str = "image_data") -> None:
        """Refuse (``ValueError``, HTTP 400 in SGLang) a media item this server may not load, naming the flag."""
        text = item if isinstance(item, str) else None
        if text is None:
            return  # bytes, decoded images, preprocessed features: nothing to open or fetch
        head = text[:16].lower()
        if head.startswith("data:"):
            return
        if head.startswith(("http://", "https://")):
            host = (urlparse(text).hostname or "").lower().rstrip(".")
            if host and host in self.url_domains:
                return
            raise ValueError(
                f"{field}: this server does not fetch media URLs ({_short(text)}); send the media inline (base64 or "
                "a data: URL), or start the server with sparsemm serve --allow-media-urls "
                f"{host or 'HOST'}"
            )
        if head.startswith("file:"):
            self._check_local(unquote(urlparse(text).path), text, field)
            return
        if "://" in text[:32]:
            raise ValueError(f"{field}: unsupported media URL scheme ({_short(text)}); send the media inline (base64)")
        if field != "image_data" or _names_a_file(text):  # SGLang opens any other video/audio string as a path
            self._check_local(text, text, field)

    def _check_local(self, path: str, shown: str, field: str) -> None:
        real = os.path.realpath(os.path.expanduser(path))
        if any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.local_dirs):
            return
        where = f" outside {', '.join(self.local_dirs)}" if self.local_dirs else ""
        inline = "base64, or a data: URL for a JPEG" if field == "image_data" else "a data: URL"
        raise ValueError(
            f"{field}: this server does not read local files{where} ({_short(shown)}); send the media inline "
            f"({inline}), or start the server with sparsemm serve --allow-local-media DIR"
        )


#: This process's media policy (``None``: not started by ``sparsemm serve``, SGLang's own behaviour).
current_policy = FromEnv(MEDIA_ENV, MediaPolicy.from_json)


def _names_a_file(text: str) -> bool:
    """Whether ``text`` could be read as a path: anything that is not base64 (whose alphabet has no ``.``, ``~`` or
    ``\\``), and anything starting with ``/`` (SGLang opens those; a base64 JPEG must come as a data: URL). Decided
    from the text alone, never by looking at the disk, so a refusal tells a client nothing about the server's files."""
    return text.startswith(("/", "~")) or any(c in text for c in ".\\")


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def media_items(value: Any) -> Iterator[Any]:
    """Every media item of a request field, through SGLang's nestings (lists per request, ``{"url": ...}`` dicts,
    ``ImageData``-like objects with ``.url``)."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from media_items(v)
    elif isinstance(value, dict):
        if "url" in value:
            yield value["url"]
    elif isinstance(value, str) or value is None:
        if value is not None:
            yield value
    elif isinstance(getattr(value, "url", None), str):
        yield value.url


def check_request_media(request: Any, policy: MediaPolicy) -> None:
    """Check every media item of a request object (``GenerateReqInput``-like) against the policy."""
    for field in MEDIA_FIELDS:
        for item in media_items(getattr(request, field, None)):
            policy.check(item, field)
