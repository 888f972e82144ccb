"""The model layer: config, checkpoint loader, LLaMA-family transformer, tokenizer."""

from dendrite.model.config import ModelConfig, RopeConfig
from dendrite.model.loader import load_model
from dendrite.model.tokenizer import Tokenizer, load_tokenizer
from dendrite.model.transformer import Transformer

__all__ = ["ModelConfig", "RopeConfig", "Tokenizer", "Transformer", "load_model", "load_tokenizer"]
