"""Metrics logged during training and testing (torchmetrics collections).

``build_metrics(task, **kw)`` returns a :class:`torchmetrics.MetricCollection`:

- ``"tokens"``: next-token accuracy and top-k accuracy over every predicted position
  (logits ``(..., V)`` vs int targets ``(...)``); no ``num_classes`` needed.
- ``"classification"``: accuracy, top-k accuracy, micro-F1 and macro-F1 over classes
  (logits ``(B, K)`` vs int targets ``(B,)``); needs ``num_classes``.
"""

from ephys_gpt.metrics.classification import (  # noqa: F401
    TASKS,
    TokenAccuracy,
    build_metrics,
    flatten_logits,
)
