"""`python -m llmirc ...`: the `llmirc` console script."""

from llmirc.entry import main

main()
