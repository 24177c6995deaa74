"""`ember models`: the named models `--model` accepts, with family, size and where the shape comes from."""

from __future__ import annotations

from ember.models.registry import get_model_spec, list_models


def add_arguments(parser) -> None:
    parser.add_argument("--family", default=None, help="only this family (llama, qwen3, mixtral, grok1, bloom, ...)")


def _size(params: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= scale:
            return f"{params / scale:.2f}{unit}"
    return str(params)


def run(args) -> int:
    specs = [get_model_spec(name) for name in list_models()]
    if args.family:
        specs = [spec for spec in specs if spec.family == args.family]
    width = max((len(spec.name) for spec in specs), default=4)
    print(f"{'name':<{width}}  {'family':<7}  {'params':>8}  {'layers':>6}  {'width':>6}  source")
    for spec in specs:
        a = spec.args
        print(f"{spec.name:<{width}}  {spec.family:<7}  {_size(a.num_params()):>8}  {a.n_layers:>6}  {a.dim:>6}  "
              f"{spec.source}")
    return 0
