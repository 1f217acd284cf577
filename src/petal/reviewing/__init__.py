"""Closing the loop from "suspect" to "better model": `petal review` and `petal retrain`.

    cards.py       the audit's findings of a run as cards, most suspicious first
    queue.py       new photos queued for labeling (uncertainty x diversity; unknowns apart)
    featuremap.py  the embeddings in 2-D (t-SNE, PCA past TSNE_CAP)
    log.py         RUN/review.csv and RUN/labeled.csv: every decision, saved atomically
    session.py     one review: answer, select on the map, undo, progress
    workbench.py   all of it gathered for the page
    app.py         the page's FastAPI routes (token, CSRF-safe POSTs); server.py runs them
    retrain.py     what petal retrain (petal.runs.retrain) takes from a review; old vs new metrics
    static/        review.html, review.js, review.css (the look: petal.webpage's cards.css)

Nothing here imports FastAPI at import time but app.py and server.py.
"""
