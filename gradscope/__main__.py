"""`python -m gradscope`: the same as the `gradscope` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
