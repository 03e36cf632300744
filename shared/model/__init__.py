"""Model loading and the Llama-family implementation.

    model, hf_config = load_model(model_dir, dtype, device)
    model.bind_kv_cache(kv_cache)   # [num_blocks, num_layers, 2, block_size, Hkv, D]
    hidden = model(input_ids, positions, attn_metadata)   # [T, H]
    logits = model.compute_logits(hidden[rows])          # [N, V] model dtype
"""

from splitserve.shared.model.attention import Attention, AttentionMetadata
from splitserve.shared.model.layers import UnsupportedRopeError
from splitserve.shared.model.llama import LlamaFlags, LlamaForCausalLM, WeightLoadError
from splitserve.shared.model.loader import CheckpointError, ModelInfo, load_hf_config, load_model, model_info
from splitserve.shared.model.registry import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Attention",
    "AttentionMetadata",
    "CheckpointError",
    "LlamaFlags",
    "LlamaForCausalLM",
    "ModelInfo",
    "UnsupportedArchitectureError",
    "UnsupportedRopeError",
    "WeightLoadError",
    "load_hf_config",
    "load_model",
    "model_info",
]
