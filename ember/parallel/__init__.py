"""How a model is laid out over devices, each piece applied from outside to a plain Transformer:

- `mesh.py`: a `Layout` (`ember.config.layout`, where impossible layouts are refused) -> named DeviceMeshes;
- `tensor.py` (+ `loss.py`): tensor and sequence parallelism, vocab-parallel cross-entropy;
- `experts.py`: expert parallelism (all-to-all dispatch); `context.py`: context parallelism;
- `pipeline.py`: pipeline stages and schedules; `fsdp.py`: data parallelism (FSDP2);
- `recompute.py`: activation recomputation; `dtensor.py`: local shards of DTensors, gradients made
  whole (the norm, clip and skip over a layout are `ember.train.gradients`);
- `estimate.py`: memory and communication estimates (for `ember plan`, which is `ember.plan`).

`ember.train.model_setup.parallelize` composes them in torchtitan's order:
TP -> EP -> CP -> recompute -> compile -> FSDP."""
