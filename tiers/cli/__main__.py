"""`python -m tiers.cli`: the same as the `tierkit` command."""
from tiers.cli import main

main()
