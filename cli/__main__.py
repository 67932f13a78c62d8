"""`python -m kvstore.cli`: the same as the `kvstore` console script."""

from .main import main

main()
