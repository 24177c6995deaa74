"""ember's model: one decoder-only transformer (`Transformer`) configured by `ModelArgs`,
named configurations (`get_model_args`, `list_models`) and Hugging Face conversion (`hf`)."""

from ember.models.args import ModelArgs
from ember.models.attention import KVCache
from ember.models.registry import get_model_args, get_model_family, list_models
from ember.models.transformer import Transformer

__all__ = ["KVCache", "ModelArgs", "Transformer", "get_model_args", "get_model_family", "list_models"]
