"""`python -m petal ...`, the same as the `petal` command (and what torchrun runs:
`torchrun --nproc-per-node N -m petal train DATA --out RUN --finetune`)."""

from petal.cli import main

if __name__ == "__main__":
    main()
