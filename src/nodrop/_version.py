"""nodrop's version: the one place it is written.

The scheme is PEP 440 ``MAJOR.MINOR.PATCH`` (with ``.devN`` between
releases). Before 1.0, a MINOR bump may change the command line or the
control protocol; a PATCH release never does. Every release has its entry
at the top of ``CHANGELOG.md`` (a test checks that the two agree), and the
wheel, the sdist and ``nodrop --version`` all read this string.
"""

__version__ = "0.2.0"
