"""Small helpers for text meant for people: counted nouns, wrapped lines, errors as reasons."""

from __future__ import annotations

import re
import textwrap


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 epoch"``, ``"3 epochs"`` (``many``: an irregular plural).

    Example:
        >>> plural(1, "epoch"), plural(2, "epoch"), plural(0, "class", "classes")
        ('1 epoch', '2 epochs', '0 classes')
    """
    return f"{n} {word if n == 1 else (many or word + 's')}"


_LABEL = re.compile(r"^(\s*(?:[\w/ -]{1,12}:\s+)?)")


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


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (at most ``limit`` characters of it): an error as a reason."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__


def file_reason(error: object) -> str:
    """Why a file could not be read, on one line, without the advice about training options
    (removing the file, ``on_bad_file=``) that does not apply where a file is predicted,
    scored or used as an example."""
    return " ".join(str(error).split()).split(" Remove the file")[0]
