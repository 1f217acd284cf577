"""What a run does, from its spec (petal.spec) to its folder (petal.run):

- `common`: open a run, record it, finish it (audit, trust, metrics, test split, report) — the
  one path both trainers end through;
- `head`: `petal train`, a head on cached features;
- `finetune/`: `petal finetune`, backbone blocks trained with a new head (needs torch);
- `audit`: `petal audit`; `evaluate`: `petal evaluate`; `reexport`: `petal export RUN`;
  `retrain`: `petal retrain RUN`.

Nothing is imported here, so that `petal.runs.finetune.config` stays light for the CLI.
"""
