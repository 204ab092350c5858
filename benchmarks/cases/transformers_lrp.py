"""LRP for transformers (AttnLRP) on HuggingFace models of BERT-base size (hidden size 768,
12 layers, 12 heads), from input embeddings: fastattr's LRP with the AttnLRP canonizer, lxt's
AttnLRP (efficient mode, its patches applied around each call) and the floor, the model's own
forward and one backward to the embeddings. Captum's LRP has no rule for layer norm, embeddings
or attention.

    fastattr bench --cases benchmarks/cases/transformers_lrp.py --batch-sizes 4 --threads 2

- BERT-base (sequence classification) on its eager and SDPA attention paths, 128 tokens;
- a LLaMA-style decoder of the same width (grouped-query attention with 4 key-value heads,
  SwiGLU MLP of 2048, RMSNorm, rotary positions; vocabulary 1000), SDPA path, the logits of
  the last position.
"""

from functools import partial

import torch

from fastattr.bench import contenders
from fastattr.bench.cases import TARGET, Case
from fastattr.bench.floors import input_floor
from fastattr.bench.models import HuggingFaceLogits

TOKENS = 128
BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}


def bert(attention: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        **BASE, intermediate_size=3072, num_labels=2, attn_implementation=attention
    )
    return HuggingFaceLogits(transformers.BertForSequenceClassification(config).eval())


def llama() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **BASE, num_key_value_heads=4, intermediate_size=2048, vocab_size=1000,
        attn_implementation="sdpa",
    )  # fmt: skip
    return HuggingFaceLogits(transformers.LlamaForCausalLM(config).eval(), position=-1)


def embeddings(batch: int, generator: torch.Generator) -> dict:
    """Standard-normal input embeddings of 128 tokens and an attention mask of ones."""
    inputs = torch.randn(batch, TOKENS, BASE["hidden_size"], generator=generator)
    mask = torch.ones(batch, TOKENS, dtype=torch.long)
    return {"inputs": inputs, "additional_forward_args": (mask,)}


LXT = {"lxt": contenders.lxt_attnlrp}
ATTNLRP = contenders.with_attnlrp()
CASES = (
    Case(
        "LRP", "bert-base", partial(bert, "eager"), embeddings, input_floor,
        call_kwargs={"target": TARGET}, uses_path=False, others=LXT, construct=ATTNLRP,
    ),
    Case(
        "LRP", "bert-base-sdpa", partial(bert, "sdpa"), embeddings, input_floor,
        call_kwargs={"target": TARGET}, uses_path=False, others=LXT, construct=ATTNLRP,
    ),
    Case(
        "LRP", "llama", llama, embeddings, input_floor, call_kwargs={"target": TARGET},
        uses_path=False, others=LXT, construct=ATTNLRP,
    ),
)  # fmt: skip
