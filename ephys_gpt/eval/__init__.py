"""Evaluation: runners (registered by name, see ``registry``) and the helpers they share.

- ``eval_quant``: ``EvalQuant`` for token models (history sweep, N-step curves vs baselines,
  free-running generation compared by PSD and covariance).
- ``spectral``: Welch PSD, alpha-peak finder, covariance/correlation similarity.
- ``plots``: figures saved as ``.png`` + ``.pdf``; ``report``: curves, ``summary.json``,
  ``report.md``; ``fif``: generated arrays back to MNE Raw ``.fif``.

See ``docs/evaluation.md``.
"""
