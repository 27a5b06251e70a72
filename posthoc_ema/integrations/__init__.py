"""Post-hoc EMA in the training frameworks people already use.

One leaf module per framework; each imports its framework when it is imported,
and nothing else in posthoc-ema imports them:

- :mod:`posthoc_ema.integrations.lightning`: a Lightning ``Callback``
  (``pip install 'posthoc-ema[lightning]'``); for the ``pytorch_lightning``
  package name, :mod:`posthoc_ema.integrations.pytorch_lightning`;
- :mod:`posthoc_ema.integrations.transformers`: a Hugging Face ``TrainerCallback``
  (``pip install 'posthoc-ema[transformers]'``);
- Accelerate needs no module: pass the tracker to
  ``accelerator.register_for_checkpointing`` (see docs/accelerate.md).
"""
