"""``python -m saliaudit``: the same command line as ``saliaudit``."""

from .cli import main

if __name__ == "__main__":
    main()
