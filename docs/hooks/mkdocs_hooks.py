"""mkdocs hooks (see ``hooks:`` in mkdocs.yml).

``# skip-test`` as the first line of a fenced code block tells tests/test_docs.py not to
run that block; it is a note for the test, not for readers, so it is removed from the page.
"""

from __future__ import annotations

import re
from typing import Any

# a fence line (```python, ```bash, ...) followed by a "# skip-test ..." line
SKIP_MARKER = re.compile(r"^(?P<fence>[ \t]*```[^\n]*\n)[ \t]*# skip-test[^\n]*\n", re.M)


def strip_skip_markers(markdown: str) -> str:
    """The page without the ``# skip-test`` lines that open code blocks."""
    return SKIP_MARKER.sub(r"\g<fence>", markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return strip_skip_markers(markdown)
