"""`python -m petal ...`, the same as the `petal` command (and what torchrun runs:
`torchrun --nproc-per-node N -m petal finetune DATA --out RUN`)."""

from petal.cli import main

if __name__ == "__main__":
    main()
