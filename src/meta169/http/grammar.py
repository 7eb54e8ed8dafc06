"""The HTTP grammar meta169 checks by hand, written once (RFC 9110 section 5.6.2).

The servers parse with httptools; these patterns serve the places that read bytes
themselves: the proxy's framing of serve's replies and the tests' request builders.
"""

from __future__ import annotations

import re

# tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
TOKEN_RE = re.compile(TOKEN)
