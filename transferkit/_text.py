"""Small helpers for text meant for people: counted nouns, wrapped lines, errors as reasons."""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
import urllib.parse
from collections.abc import Callable
from pathlib import Path
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


def fs_bytes(text: str) -> bytes:
    """``text`` (a file name, a path, a key read from a tar) as UTF-8 bytes; the undecodable
    bytes of a name in another encoding, which Python keeps as surrogates, as they were.

    Example:
        >>> fs_bytes("caf\\udce9.png"), fs_bytes("café")
        (b'caf\\xe9.png', b'caf\\xc3\\xa9')
    """
    return text.encode("utf-8", "surrogateescape")


def not_utf8(text: str) -> bool:
    """Whether ``text`` holds a file name's undecodable bytes (kept by Python as surrogates),
    which no UTF-8 file (an export's labels, JSON) can hold.

    Example:
        >>> not_utf8("caf\\udce9"), not_utf8("café")
        (True, False)
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
_SCRIPTED_FAIL = re.compile(r"^(\w*(?:Error|Exception)): (.+)$", re.MULTILINE)  # an operation's own error, last


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
        >>> exception_line(RuntimeError("The following operation failed in the TorchScript interpreter.\\n"
        ...                             "Traceback of TorchScript ...\\nRuntimeError: Input type (unsigned char) ..."))
        'RuntimeError: Input type (unsigned char) ...'

    A first line that ends with a colon introduces the next (TorchScript's compiler states the
    signature first, then what is wrong with it): both are kept.

        >>> exception_line(RuntimeError("forward(Tensor x) -> Tensor[]:\\nExpected a value of type 'Tensor'"))
        "RuntimeError: forward(Tensor x) -> Tensor[]: Expected a value of type 'Tensor'"
    """
    text = str(exc).strip()
    scripted = "TorchScript interpreter" in text
    raised = (_SCRIPTED_RAISE.findall(text) or _SCRIPTED_FAIL.findall(text)) if scripted else []
    if raised:
        return f"{raised[-1][0]}: {raised[-1][1][:limit]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = f"{lines[0]} {lines[1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:limit]}" if text else type(exc).__name__


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


# Query parameters whose values are secret, hidden wherever a URL is shown: they sign a URL or
# carry a credential (S3 and GCS X-Amz-*, X-Goog-*; Azure SAS sig; CloudFront Signature, Policy,
# Key-Pair-Id; Tencent q-*; tokens, API keys, passwords).
_SECRET = re.compile(r"x-amz-[\w-]*|x-goog-[\w-]*|sig|sign|hmac|policy|key-pair-id|jwt|hdnts|q-ak|q-sign-[\w-]*|"
                     r"[\w-]*signature|[\w-]*token_*|[\w-]*secret|secret[_-][\w-]*|[\w-]*credentials?|"
                     r"[\w-]*pass(?:word|wd|phrase)?|pw|pwd|auth|authorization|session[\w-]*|verify|[\w-]*key",
                     re.IGNORECASE)
# The signing schemes whose parameters change with each signing, each known by the parameter that
# carries its signature (and the scheme's version): (marks, its parameters). Only these leave a
# URL's identity (`unsigned`); other parameters, secret or not, name what the URL gives.
_SCHEMES = (
    (("X-Amz-Signature",), re.compile(r"x-amz-[\w-]*", re.IGNORECASE)),  # S3 (SigV4)
    (("X-Goog-Signature",), re.compile(r"x-goog-[\w-]*", re.IGNORECASE)),  # Google Cloud Storage (V4)
    (("sig", "sv"), re.compile(r"sv|ss|srt|sp|se|st|spr|sig|si|sr|sdd|sip|skoid|sktid|skt|ske|sks|skv|saoid|suoid|"
                               r"scid|ses")),  # Azure SAS
    (("Signature",), re.compile(r"Signature|Expires|AWSAccessKeyId|GoogleAccessId|Policy|Key-Pair-Id|"
                                r"x-amz-security-token", re.IGNORECASE)),  # S3 (V2), GCS (V2), CloudFront
)
_SCHEME_BEFORE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]{0,31}$")  # a URL's scheme, read back from its "://"
_URL_END = re.compile(r"[\s\"<>\\]|'(?=[\s,.;:)\]}]|$)")  # where a URL shown in text ends
# a query parameter of a URL; its value ends at & # ; : (a shard sample's url:key keeps its key),
# whitespace, a quote or a backslash (JSON text)
_PARAM = re.compile(r"([?&])([\w.~%+\[\]-]+)=([^&#;:\s'\"<>\\]*)")
# credentials on a command line (a pipe: shard): a header's, curl's -u, and environment variables
_COMMAND_SECRETS = re.compile(r"((?i:authorization|x-api-key|api-key|cookie):\s*(?i:bearer\s+|basic\s+|token\s+)?)"
                              r"([^\s'\"]+)|((?:\s-u|\s--user)\s+['\"]?)([^\s'\"]+)|"
                              r"((?:^|(?<=[\s:]))[A-Z][A-Z0-9_]*(?:SECRET|TOKEN|KEY|PASSWORD|PASS|CREDENTIALS?)"
                              r"[A-Z0-9_]*=)"
                              r"([^\s'\"]+)")


def secret_parameter(name: str) -> bool:
    """Whether a URL's query parameter ``name`` carries a secret (a signature, token, key or password).

    Example:
        >>> [secret_parameter(n) for n in ("X-Amz-Signature", "sig", "pageToken", "x-api-key", "auth[token]", "tokens")]
        [True, True, True, True, True, False]
    """
    return any(_SECRET.fullmatch(part) for part in re.split(r"[\[\]]+", urllib.parse.unquote_plus(name)) if part)


def _hidden_value(m: re.Match) -> str:
    if not secret_parameter(m.group(2)):
        return m.group(0)
    value = m.group(3)
    kept = len(value) - len(value.rstrip(".,)]}"))  # the sentence's
    return f"{m.group(1)}{m.group(2)}=\u2026{value[len(value) - kept:] if kept else ''}"


def hide_url(url: str) -> str:
    """The URL ``url`` (all of it, spaces included) with its secrets shown as ``…``: the
    values of its secret parameters (`secret_parameter`) and its user name and password (an
    ``http(s)`` URL's user name may be a token; another scheme's user name alone is shown,
    ``ssh://git@host``).

    Example:
        >>> hide_url("https://ann:p@ss@h/a.tar?X-Amz-Signature=9f&v=2")
        'https://\u2026@h/a.tar?X-Amz-Signature=\u2026&v=2'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        cut = min(cut, i) if i >= 0 else cut
    at = rest.rfind("@", 0, cut)
    if at >= 0 and (":" in rest[:at] or scheme.lower() in ("http", "https")):
        rest = "\u2026" + rest[at:]
    if "=" in rest:
        rest = _PARAM.sub(_hidden_value, rest)
    return f"{scheme}{sep}{rest}"


def _urls_rewritten(text: str, rewrite: Callable[[str], str]) -> str:
    """``text`` with each URL in it (a scheme, ``://``, up to a space, a closing quote or a
    backslash) replaced by ``rewrite(url)``. Scanned from each ``://``: linear in the text."""
    if "://" not in text:
        return text
    out, last = [], 0
    for m in re.finditer("://", text):
        if m.start() < last:
            continue
        scheme = _SCHEME_BEFORE.search(text, max(last, m.start() - 32), m.start())
        if scheme is None:
            continue
        end = _URL_END.search(text, m.end())
        stop = end.start() if end else len(text)
        out += [text[last:scheme.start()], rewrite(text[scheme.start():stop])]
        last = stop
    return "".join(out) + text[last:]


def hide_query(text: str) -> str:
    """The values of secret query parameters anywhere in ``text`` shown as ``…``: for text
    known to quote parts of a URL (an HTTP client's reason, ``'/a b.tar?sig=...'``), where
    `hide_secrets` finds no whole URL; not for text that may hold names (``Q&A&key=1``).

    Example:
        >>> hide_query("URL can't contain control characters. '/my shard.tar?sig=9f3a' (found at least ' ')")
        "URL can't contain control characters. '/my shard.tar?sig=\u2026' (found at least ' ')"
    """
    return _PARAM.sub(_hidden_value, text) if "=" in text else text


def hide_secrets(text: str) -> str:
    """``text`` with the secrets of the URLs in it shown as ``…`` (`hide_url`), and those of a
    command line's credentials (``-H 'Authorization: Bearer ...'``, ``-u user:pw``,
    ``AWS_SECRET_ACCESS_KEY=...``); nothing else changes. Every error and warning of
    transferkit's passes through it, so that a signed URL's signature does not reach logs, nor
    an export's metadata.

    Example:
        >>> hide_secrets("Cannot fetch 'https://h/a.tar?X-Amz-Signature=9f3a&versionId=2': HTTP 403.")
        "Cannot fetch 'https://h/a.tar?X-Amz-Signature=\u2026&versionId=2': HTTP 403."
        >>> hide_secrets("Bad image https://ann:pw@h/a.tar?sig=9f:000123, left out; dl.php?id=3&key=7.jpg too")
        'Bad image https://\u2026@h/a.tar?sig=\u2026:000123, left out; dl.php?id=3&key=7.jpg too'
    """
    text = _urls_rewritten(text, hide_url)
    if ":" in text or "=" in text:
        text = _COMMAND_SECRETS.sub(lambda m: "".join(
            g if i % 2 == 0 else "\u2026" for i, g in enumerate(m.groups()) if g is not None), text)
    return text


def _unsigned_url(url: str) -> str:
    base, mark, rest = url.partition("?")
    if not mark:
        return url
    query, hash_mark, fragment = rest.partition("#")
    params = [p for p in query.split("&") if p]
    names = {urllib.parse.unquote_plus(p.partition("=")[0]) for p in params}
    for marks, scheme in _SCHEMES:
        if all(m in names for m in marks):
            params = [p for p in params if not scheme.fullmatch(urllib.parse.unquote_plus(p.partition("=")[0]))]
    return base + (f"?{'&'.join(params)}" if params else "") + hash_mark + fragment


def unsigned(text: str) -> str:
    """``text`` with the URLs in it stripped of the parameters of a signing scheme they carry
    (S3, Google Cloud Storage, Azure SAS, CloudFront): what names the same object under a new
    signature. Other parameters stay, secret or not (``?key=train-000``, ``?token=...`` may
    name what the URL gives).

    Example:
        >>> unsigned("https://h/a.tar?versionId=2&X-Amz-Date=20261203&X-Amz-Signature=9f3a")
        'https://h/a.tar?versionId=2'
        >>> unsigned("https://h/get?key=train-000.tar&token=abc")
        'https://h/get?key=train-000.tar&token=abc'
    """
    return _urls_rewritten(text, _unsigned_url)



def hide_secrets_in(obj: Any) -> Any:
    """`hide_secrets` on every string of plain data (dicts, lists, tuples), keys included.

    Example:
        >>> hide_secrets_in({"data": ["https://h/a.tar?sig=c2ln"], "epochs": 3})
        {'data': ['https://h/a.tar?sig=\u2026'], 'epochs': 3}
    """
    if isinstance(obj, str):
        return hide_secrets(obj)
    if isinstance(obj, dict):
        return {hide_secrets_in(k): hide_secrets_in(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(hide_secrets_in(v) for v in obj)
    return obj


def home_not_expanded(path: object) -> str:
    """Where ``path`` starts with ``~`` (read as written: Python, unlike a shell or a config
    file, does not expand it), a sentence that says so, for an error about a file not found;
    else ``""``.

    Example:
        >>> home_not_expanded("~/model.pt")
        " A path starting with '~' is read as written here; give the full path (os.path.expanduser('~/model.pt'))."
    """
    text = str(path)
    if not text.startswith("~"):
        return ""
    return f" A path starting with '~' is read as written here; give the full path (os.path.expanduser({text!r}))."


def expand_home(path: Any) -> Any:
    """``path`` with a leading ``~`` expanded as a shell and a config file do (a str stays a str,
    a Path a Path); any other value as it is.

    Example:
        >>> expand_home("~/m.pt") == os.path.expanduser("~/m.pt"), expand_home("runs/m.pt"), expand_home(3)
        (True, 'runs/m.pt', 3)
    """
    if isinstance(path, (str, Path)) and str(path).startswith("~"):
        return type(path)(os.path.expanduser(path))
    return path
