"""Layer and neuron integrated gradients on a deeper MLP and a masked text model.

    fastattr bench --cases benchmarks/cases/layer_neuron_ig.py --batch-sizes 32,64

- NeuronIntegratedGradients on unit 7 of the first layer of a 9-layer MLP (width 512): fastattr
  runs the forward only up to the neuron's layer, Captum the whole network on every path point.
- LayerIntegratedGradients on the output of the third layer of that MLP.
- LayerIntegratedGradients on the token embedding of the built-in transformer, with an
  attention mask passed as an additional forward argument and padding tokens as baselines.
"""

from functools import partial

from fastattr.bench import models
from fastattr.bench.cases import TARGET, Case, features, tokens
from fastattr.bench.floors import layer_floor, neuron_floor

WIDTH = 512
deep_mlp = partial(models.mlp, features=WIDTH, width=WIDTH, layers=9)
wide_features = partial(features, count=WIDTH)

CASES = (
    Case(
        "NeuronIntegratedGradients", "deep-mlp", deep_mlp, wide_features, neuron_floor("fc1"),
        layer="fc1", call_kwargs={"neuron_selector": 7},
    ),
    Case(
        "LayerIntegratedGradients", "deep-mlp", deep_mlp, wide_features, layer_floor("fc3"),
        layer="fc3", call_kwargs={"target": TARGET},
    ),
    Case(
        "LayerIntegratedGradients", "masked-transformer", models.transformer,
        partial(tokens, masked=True), layer_floor("embedding"), layer="embedding",
        call_kwargs={"target": TARGET},
    ),
)  # fmt: skip
