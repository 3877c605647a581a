"""Small helpers for text meant for people: counted nouns, wrapped lines, errors as reasons."""

from __future__ import annotations

import json
import math
import re
import textwrap
import urllib.parse
from typing import Any


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 epoch"``, ``"3 epochs"`` (``many``: an irregular plural).

    Example:
        >>> plural(1, "epoch"), plural(2, "epoch"), plural(0, "class", "classes")
        ('1 epoch', '2 epochs', '0 classes')
    """
    return f"{n} {word if n == 1 else (many or word + 's')}"


_LABEL = re.compile(r"^(\s*(?:[\w/ -]{1,12}:\s+)?)")


def number(value: float) -> str:
    """A score or loss for people: 4 decimals on the usual scales, 4 significant digits far
    from them (an MSE of 3e-11 or of 1e+76 in the targets' own units).

    Example:
        >>> number(0.99184), number(3.2e-11), number(2.5e76), number(0.0), number(12345.678)
        ('0.9918', '3.2e-11', '2.5e+76', '0.0000', '12345.6780')
    """
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 or value != value else f"{value:.4g}"


def wrap_lines(text: str, width: int = 100) -> str:
    """Each line of ``text`` wrapped at ``width`` characters; continuation lines are indented to
    where the line's text starts after a short label (``"  policy:   "``), so columns stay aligned.

    Example:
        >>> print(wrap_lines("  data:  " + "word " * 8, width=30))
          data:  word word word word
                 word word word word
    """
    out = []
    for line in text.splitlines():
        if len(line) <= width:
            out.append(line)
            continue
        lead = _LABEL.match(line).group(1)
        indent = " " * len(lead) if len(lead) < width // 2 else "    "
        out.append(textwrap.fill(line[len(lead):], width=width, initial_indent=lead, subsequent_indent=indent,
                                 break_on_hyphens=False, break_long_words=False))
    return "\n".join(out)


def one_line(text: str) -> bool:
    """Whether ``text`` is one line with no control character: no line boundary of Python's
    ``str.splitlines`` (``\\n``, ``\\r``, ``\\x85``, U+2028, U+2029, ...), so that a file of
    such names, one per line, reads back as the same names.

    Example:
        >>> one_line("ants"), one_line("ant\\u2028s"), one_line("ant\\ts")
        (True, False, False)
    """
    return text.splitlines() == [text] and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


_SCRIPTED_RAISE = re.compile(r"^builtins\.(\w+): (.+)$", re.MULTILINE)


def printable(text: str) -> str:
    """``text`` with its control characters and line boundaries written as Python escapes, so
    that a name holding them stays on one line (and one column) of plain output.

    Example:
        >>> print(printable("new\\nline\\tcat.png"), printable("café.png"))
        new\\nline\\tcat.png café.png
    """
    return text if one_line(text) else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (at most ``limit`` characters of it): an error as a
    reason. An error raised inside TorchScript code is the one that code raised (the last
    ``builtins.ValueError: ...`` line of the interpreter's report), not its first line.

    Example:
        >>> exception_line(RuntimeError("The following operation failed in the TorchScript interpreter.\\n"
        ...                             "Traceback of TorchScript ...\\nbuiltins.ValueError: pixels in [0, 1]\\n"))
        'ValueError: pixels in [0, 1]'
    """
    text = str(exc).strip()
    raised = _SCRIPTED_RAISE.findall(text) if "TorchScript interpreter" in text else []
    if raised:
        return f"{raised[-1][0]}: {raised[-1][1][:limit]}"
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__


def file_reason(error: object) -> str:
    """Why a file could not be read, on one line, without the advice about training options
    (removing the file, ``on_bad_file=``) that does not apply where a file is predicted,
    scored or used as an example.

    Example:
        >>> file_reason("Cannot read 'a.jpg': truncated. Remove it, or pass on_bad_file='skip' to leave it out.")
        "Cannot read 'a.jpg': truncated."
    """
    text = " ".join(str(error).split())
    for advice in (" Remove the file", " Remove it, or pass on_bad_file"):
        text = text.split(advice)[0]
    return text


def finite_json(obj: Any) -> Any:
    """``obj`` (plain JSON data) with every number that is not finite (NaN, inf: an undefined
    R^2, a user's own record) made null, which JSON has, where NaN is not JSON at all."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def strict_json(obj: Any, **options: Any) -> str:
    """``json.dumps`` of `finite_json` (``options``: ``indent``, ``sort_keys``, ...): text every
    JSON parser reads.

    Example:
        >>> strict_json({"r2": float("nan"), "n": [1, float("inf")]})
        '{"r2": null, "n": [1, null]}'
    """
    return json.dumps(finite_json(obj), allow_nan=False, **options)


# query parameters that sign a URL or carry a credential: S3 and GCS (X-Amz-*, X-Goog-*),
# Azure SAS (sv, sp, se, sig, ...), CloudFront (Signature, Policy, Key-Pair-Id, Expires) and
# tokens or keys. Their values are secret and change with each new signature.
_SIGNING = re.compile(r"x-amz-[\w-]*|x-goog-[\w-]*|sig|signature|policy|key-pair-id|expires|[\w-]*token|"
                      r"[\w-]*key|[\w-]*secret|credential|password|"
                      r"sv|ss|srt|sp|se|st|spr|si|sr|sdd|sip|skoid|sktid|skt|ske|sks|skv|saoid|suoid|scid|ses",
                      re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def signing_parameter(name: str) -> bool:
    """Whether a URL's query parameter ``name`` signs the URL or carries a credential.

    Example:
        >>> [signing_parameter(n) for n in ("X-Amz-Signature", "sig", "token", "versionId", "shard")]
        [True, True, True, False, False]
    """
    return bool(_SIGNING.fullmatch(name))


def _url_rewritten(url: str, drop: bool) -> str:
    """``url`` with its secret parts shown as ``…`` (``drop``: left out)."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    netloc = parts.netloc
    if password:
        netloc = netloc.replace(":" + password + "@", "@" if drop else ":\u2026@", 1)
    kept = []
    for q in parts.query.split("&") if parts.query else []:
        name = q.partition("=")[0]
        if signing_parameter(urllib.parse.unquote_plus(name)):
            if drop:
                continue
            q = name + "=\u2026"
        kept.append(q)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "&".join(kept), parts.fragment))


def _urls_rewritten(text: str, drop: bool) -> str:
    return _URL_IN_TEXT.sub(lambda m: _url_rewritten(m.group(0), drop), text) if "://" in text else text


def hide_secrets(text: str) -> str:
    """``text`` with the secret parts of the URLs in it shown as ``…``: the values of query
    parameters that sign a URL or carry a credential (`signing_parameter`) and a password
    before ``@``. Every error and warning of transferkit's passes through it, so that a
    signed URL's signature does not reach logs, nor an export's metadata.

    Example:
        >>> hide_secrets("Cannot fetch 'https://h/a.tar?X-Amz-Signature=9f3a&versionId=2': HTTP 403")
        "Cannot fetch 'https://h/a.tar?X-Amz-Signature=\u2026&versionId=2': HTTP 403"
    """
    return _urls_rewritten(text, drop=False)


def unsigned(text: str) -> str:
    """``text`` with the URLs in it stripped of their signing parameters and passwords: what
    names the same data under a new signature (a shard's cached copy, its index, the data's
    digest and a resume compare it).

    Example:
        >>> unsigned("https://h/a.tar?versionId=2&X-Amz-Date=20261203&X-Amz-Signature=9f3a")
        'https://h/a.tar?versionId=2'
    """
    return _urls_rewritten(text, drop=True)
