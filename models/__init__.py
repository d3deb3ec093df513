"""PyTorch models written from first principles: attention, positions, norms, the translator, ViT."""

from transerve.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.vit import ViT, ViTConfig

__all__ = [
    "CheckpointError",
    "Seq2SeqTransformer",
    "TransformerConfig",
    "ViT",
    "ViTConfig",
    "load_checkpoint",
    "save_checkpoint",
]
