"""How a model is laid out over devices, each piece applied from outside to a plain Transformer:

- `mesh.py`: degrees -> named DeviceMeshes, and every impossible layout refused in one line;
- `tensor.py` (+ `loss.py`): tensor and sequence parallelism, vocab-parallel cross-entropy;
- `experts.py`: expert parallelism (all-to-all dispatch); `context.py`: context parallelism;
- `pipeline.py`: pipeline stages and schedules; `fsdp.py`: data parallelism (FSDP2);
- `recompute.py`: activation recomputation; `gradients.py`: gradients across a layout (norm, clip);
- `estimate.py` / `plan.py`: memory and communication estimates (`ember plan`).

`ember.train.model_setup.parallelize` composes them in torchtitan's order:
TP -> EP -> CP -> recompute -> compile -> FSDP."""
