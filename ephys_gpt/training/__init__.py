"""Training: run-config validation, the Lightning module, experiment runners, checkpoints.

- :mod:`~ephys_gpt.training.config`: ``load_config(path, overrides=(), mode="train")``
- :mod:`~ephys_gpt.training.lit_model`: ``LitModel``
- :mod:`~ephys_gpt.training.experiment`: ``ExperimentDL(config).train() / .test()``
- :mod:`~ephys_gpt.training.checkpoint`: ``SafeCheckpointIO`` (Lightning never unpickles)
- :mod:`~ephys_gpt.training.resume`, ``interrupt``, ``guards``, ``run_folder``: exact resume,
  Ctrl-C checkpoints, non-finite-loss and zero-step guards, the run folder and its split
- :mod:`~ephys_gpt.training.commands`: the ``train``/``test``/``list-models`` commands

Submodules are imported on use (Lightning is only loaded when training).
"""
