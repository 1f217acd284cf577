"""`python -m petal.cli ...`, the same as the `petal` command."""

from petal.cli.app import main

if __name__ == "__main__":
    main()
