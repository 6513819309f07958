"""Allows ``python -m vtransfer``."""

from vtransfer.cli import main

if __name__ == "__main__":
    main()
