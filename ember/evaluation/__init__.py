"""Evaluation of a trained checkpoint: perplexity on a dataset (`perplexity`) and few-shot
benchmarks through lm-evaluation-harness (`harness`, the `lm_eval` model class "ember").
`ember eval` (ember.commands.eval) is the command; `python -m ember.evaluation` is lm-eval's own
command line with the "ember" model registered.

This package sits beside `ember.generation` (it reads models, checkpoints and data, and nothing
above them); lm-eval is imported only by `harness`, so perplexity needs no lm-eval install.
"""
