"""Small random-init ``transformers`` architectures for the real-architecture tests.

Each builder makes the model from its config (no hub download): 2 layers, hidden size 64,
vocabulary 128, seed 0. ``TokenModel`` wraps it so the exported program takes ``input_ids``
and returns the last hidden state. Import this module only after
``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import collections
import sys
import types
from typing import Callable

import torch
from torch.fx import GraphModule

VOCAB = 128
SEQ = 16


def _importable_torchvision() -> None:
    """``transformers`` imports torchvision when it is installed; the CUDA build on the package
    index does not load beside torch 2.13 CPU (``operator torchvision::nms does not exist``).
    Stub its C-op registrations then, as ``bench/bench_zoo.py`` does (no model here uses them)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return
    except RuntimeError:
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)


_importable_torchvision()


class TokenModel(torch.nn.Module):
    """``input_ids -> last hidden state`` (no cache, tuple outputs)."""

    def __init__(self, model: torch.nn.Module, use_cache: bool) -> None:
        super().__init__()
        self.model = model
        self.use_cache = use_cache

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.use_cache else {}
        return self.model(input_ids=input_ids, return_dict=False, **kwargs)[0]


def gpt2() -> TokenModel:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    return TokenModel(GPT2Model(config), use_cache=True)


def t5_encoder() -> TokenModel:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(num_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16, vocab_size=VOCAB,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return TokenModel(T5EncoderModel(config), use_cache=False)


def llama() -> TokenModel:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return TokenModel(LlamaModel(config), use_cache=True)


def bert() -> TokenModel:
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        vocab_size=VOCAB, max_position_embeddings=64)
    return TokenModel(BertModel(config), use_cache=False)


BUILDERS: dict[str, Callable[[], TokenModel]] = {"gpt2": gpt2, "t5_encoder": t5_encoder, "llama": llama, "bert": bert}


def build(name: str) -> TokenModel:
    """The model ``name`` (a key of ``BUILDERS``), random init from seed 0, in eval mode."""
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def token_batches(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    """``count`` batches of random token ids, shape (1, SEQ)."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (1, SEQ), generator=generator),) for _ in range(count)]


def export(model: torch.nn.Module) -> GraphModule:
    return torch.export.export(model, token_batches(1, seed=99)[0]).module()


def qdq_count(gm: GraphModule) -> int:
    """quantize_per_tensor / quantize_per_channel / dequantize_* calls (quantized_decomposed), summed."""
    counts: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.name.startswith("quantized_decomposed::"):
            name = schema.name.split("::")[1]
            if name.startswith(("quantize_per", "dequantize_per")):
                counts["q" if name.startswith("quantize") else "dq"] += 1
    return counts["q"] + counts["dq"]


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    noise = (reference - actual).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise))
