"""Weights and checkpoints on disk, shared by `ember train`, `ember convert` and `ember generate`.

- `weights`: ember weight folders (ember_model.json + safetensors), streamed reads and writes.
- `training`: training checkpoints (DCP, reshardable, atomic, `latest` pointer, checksummed, read
  without running code from the files) and RNG states.
- `export`: a training checkpoint read back as a whole model, or written as an ember weight folder.
- `convert`: Hugging Face checkpoints <-> ember weight folders, one tensor at a time.
- `initialize`: filling a (parallelized) model from weights given part by part, rank 0 broadcasting.

It sits below `ember.train`: reading a checkpoint never imports the trainer. Modules are imported
on use (nothing here is imported eagerly), so `import ember.checkpoint.weights` stays light.
"""
