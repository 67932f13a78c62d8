"""`python -m kvstore.server --model ...`: the same as `kvstore serve --model ...`."""

import sys

from kvstore.cli.main import main

main(["serve", *sys.argv[1:]])
