"""`python -m heed` is the `heed` command."""

from heed.cli import main

if __name__ == "__main__":  # vLLM spawns workers that re-import __main__: keep the guard
    main()
