"""``python -m ssl_bench`` is the ``ssl-bench`` command (handy in a checkout that is not installed)."""

from .cli import main

main()
