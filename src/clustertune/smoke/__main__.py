"""Entry point of `python -m clustertune.smoke`; the command itself is `clustertune.smoke.cli`."""

from clustertune.smoke.cli import main

if __name__ == "__main__":
    main()
