"""`python -m saekit`: the `saekit` command."""

from saekit.cli import main

main()
