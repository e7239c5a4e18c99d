"""`python -m llmirc ...`: the `llmirc` console script."""

from llmirc.entry import main

if __name__ == "__main__":
    main()
