"""Model loading, the architecture registry and one file per model family.

    model, hf_config = load_model(model_dir, dtype, device)
    model.bind_kv_cache(kv_cache)   # [num_blocks, num_layers, 2, block_size, Hkv, D]
    hidden = model(input_ids, positions, attn_metadata)   # [T, H]
    logits = model.compute_logits(hidden[rows])          # [N, V] model dtype
"""

from splitserve.shared.model.attention import Attention, AttentionMetadata
from splitserve.shared.model.layers import UnsupportedConfigError, UnsupportedRopeError
from splitserve.shared.model.llama import LlamaForCausalLM
from splitserve.shared.model.loader import CheckpointError, ModelInfo, load_hf_config, load_model, model_info
from splitserve.shared.model.registry import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError
from splitserve.shared.model.weights import WeightLoadError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Attention",
    "AttentionMetadata",
    "CheckpointError",
    "LlamaForCausalLM",
    "ModelInfo",
    "UnsupportedArchitectureError",
    "UnsupportedConfigError",
    "UnsupportedRopeError",
    "WeightLoadError",
    "load_hf_config",
    "load_model",
    "model_info",
]
