"""Linear autoregressive models: per-channel AR(p) and multichannel VAR(p).

The yardstick a deep forecaster of MEG should be compared with (every eval runner reports
them) and the linear part of a model that asks for one (BENDRForecast's ``linear_fit``,
``ephys_gpt/training/data_init.py``): ridge least squares on the training split, orders
chosen on the validation split, fitted streaming with bounded memory. See
docs/evaluation.md ("Linear baselines").

- :func:`fit_linear` (``fitting.py``): fit one model on a dataset or a list of segments.
- :class:`LinearPredictor` (``predictor.py``): 1-step teacher-forced predictions, N-step
  forecasts, free-running simulation; continuous or token domain.
- :func:`fit_linear_baselines`, :class:`LinearBaselineOptions` (``baselines.py``): what an
  eval runner calls.
- :class:`Segments`, :func:`decode_tokens`, :func:`requantize`, :func:`token_bin_edges`
  (``data.py``): the data the models are fitted on and the token codec.
"""

from ephys_gpt.linear.baselines import LinearBaselineOptions, fit_linear_baselines
from ephys_gpt.linear.data import Segments, decode_tokens, requantize, token_bin_edges
from ephys_gpt.linear.fitting import DEFAULT_MAX_FEATURES, DEFAULT_RIDGE, fit_linear
from ephys_gpt.linear.predictor import LinearPredictor

__all__ = ["DEFAULT_MAX_FEATURES", "DEFAULT_RIDGE", "LinearBaselineOptions", "LinearPredictor",
           "Segments", "decode_tokens", "fit_linear", "fit_linear_baselines", "requantize",
           "token_bin_edges"]
