"""Model zoo: one decoder class, a config dataclass with named presets, swappable modules; and a
BERT-style bidirectional encoder (encoder.py); and the T5 encoder-decoder (t5.py)."""

from .cache import BatchKVCache, KVCache, RollingKVCache
from .config import PRESETS, ModelConfig
from .encoder import ENCODER_PRESETS, Encoder, EncoderConfig, save_encoder
from .flops import flops_per_token, kv_bytes_per_token, num_params
from .t5 import T5_PRESETS, T5, T5Config
from .transformer import Transformer

__all__ = ["BatchKVCache", "KVCache", "RollingKVCache", "ModelConfig", "PRESETS", "Transformer", "flops_per_token",
           "kv_bytes_per_token", "num_params", "Encoder", "EncoderConfig", "ENCODER_PRESETS", "save_encoder", "T5",
           "T5Config", "T5_PRESETS", "build_model"]


def build_model(cfg):
    """The model a config describes: a T5 for a T5Config, else the decoder (Transformer)."""
    return T5(cfg) if isinstance(cfg, T5Config) else Transformer(cfg)
