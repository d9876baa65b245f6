"""ephys-gpt: deep generative and forecasting models for MEG and other electrophysiology."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
