"""The oracle of the transformer LRP tests: lxt's AttnLRP ("efficient" mode) on HuggingFace
models, run in a process of its own because lxt patches transformers (and torch's LayerNorm
and Dropout) for the whole process, irreversibly.

``python tests/lxt_oracle.py CASES OUT`` reads the cases ``torch.save``d in CASES (a list of
dicts: family, attn, config, state, inputs, mask, position, target, outputs, inputs_of), builds
each model with lxt's patches, loads the state, and saves to OUT, per case, the target output
and lxt's relevance (a tensor times its gradient) at the inputs, at the output (the first
tensor) of each module named in ``outputs`` and at the input of each named in ``inputs_of``.
"""

from __future__ import annotations

import sys
import warnings
from functools import partial

import torch


def _patch_vit() -> None:
    # lxt ships no map for HuggingFace's ViT; this one is built from lxt's own patches, as its
    # maps for BERT and GPT-2 are: AttnLRP in the attention functions, the identity rule on
    # the activation, layer norm with the standard deviation detached, dropout off.
    from lxt.efficient import monkey_patch
    from lxt.efficient.patches import (
        dropout_forward,
        layer_norm_forward,
        non_linear_forward,
        patch_attention,
        patch_method,
    )
    from transformers.activations import GELUActivation
    from transformers.models.vit import modeling_vit

    monkey_patch(
        modeling_vit,
        {
            torch.nn.LayerNorm: partial(patch_method, layer_norm_forward),
            torch.nn.Dropout: partial(patch_method, dropout_forward),
            GELUActivation: partial(patch_method, non_linear_forward, keep_original=True),
            modeling_vit: patch_attention,
        },
    )


def _models() -> dict[str, type]:
    from lxt.efficient import monkey_patch
    from transformers.models.bert import modeling_bert
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    for module in (modeling_bert, modeling_gpt2, modeling_llama, modeling_qwen2, modeling_qwen3):
        monkey_patch(module)
    _patch_vit()
    from transformers.models.vit import modeling_vit

    # Looked up after patching: lxt replaces BERT's classes with its own copies.
    return {
        "bert": modeling_bert.BertForSequenceClassification,
        "gpt2": modeling_gpt2.GPT2LMHeadModel,
        "llama": modeling_llama.LlamaForCausalLM,
        "qwen2": modeling_qwen2.Qwen2ForCausalLM,
        "qwen3": modeling_qwen3.Qwen3ForCausalLM,
        "vit": modeling_vit.ViTForImageClassification,
    }


def _config(family: str, config: dict, attn: str):
    import transformers

    kind = {
        "bert": transformers.BertConfig,
        "gpt2": transformers.GPT2Config,
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "vit": transformers.ViTConfig,
    }[family]
    return kind(**config, attn_implementation=attn)


def relevance(case: dict, models: dict[str, type]) -> dict:
    family = case["family"]
    model = models[family](_config(family, case["config"], case["attn"]))
    model.load_state_dict(case["state"])
    model = model.to(torch.float64).eval()
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, value: object) -> None:
        tensor = value[0] if isinstance(value, tuple) else value
        tensor.retain_grad()
        seen[name] = tensor

    for name in case["outputs"]:
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, i, o, name=name: keep(name, o))
    for name in case["inputs_of"]:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(lambda m, i, name=name: keep(name, i))
    inputs = case["inputs"].clone().requires_grad_()
    if family == "vit":
        logits = model(pixel_values=inputs).logits
    else:
        extra = {} if family == "bert" else {"use_cache": False}
        logits = model(inputs_embeds=inputs, attention_mask=case["mask"], **extra).logits
    if case["position"] is not None:
        logits = logits[:, case["position"]]
    target = logits.gather(1, torch.as_tensor(case["target"]).view(-1, 1)).flatten()
    target.sum().backward(inputs=[inputs, *seen.values()])
    tapped = [(seen[name] * seen[name].grad).detach() for name in case["outputs"]]
    tapped += [(seen[name] * seen[name].grad).detach() for name in case["inputs_of"]]
    return {"inputs": (inputs * inputs.grad).detach(), "target": target.detach(), "taps": tapped}


def main(cases_path: str, out_path: str) -> None:
    warnings.filterwarnings("ignore")
    models = _models()
    cases = torch.load(cases_path, weights_only=False)
    torch.save([relevance(case, models) for case in cases], out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
