"""ember: pretrain and fine-tune large language models, from a laptop CPU to many GPU nodes."""

__version__ = "0.1.0"
