"""Signal tokenizers fitted to data (no neural network): FAST (``fast.py``) and the
``ephys-gpt tokenizer`` command that fits one on a chunk store (``commands.py``)."""
