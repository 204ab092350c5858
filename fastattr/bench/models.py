"""The benchmark's built-in models: defined here, seeded, nothing downloaded.

Every activation is its own module instance (no module is called twice in a forward), so
module hooks — which Captum's LRP and the layer methods rely on — see each use separately.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

IMAGE_SHAPE = (3, 32, 32)
MLP_FEATURES = 64
NUM_CLASSES = 10
VOCAB_SIZE = 1000
SEQUENCE_LENGTH = 32
PAD_TOKEN = 0


class SmallCNN(nn.Module):
    """Two conv + ReLU + max-pool stages and a linear head on 3x32x32 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores.

        Args:
            x: (B, 3, 32, 32) images.
        """
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        # torch.flatten rather than nn.Flatten: Captum's LRP has no rule for nn.Flatten.
        return self.fc2(self.relu3(self.fc1(torch.flatten(x, 1))))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the (projected, when the shape changes) input, then ReLU.

    Args:
        in_channels: Channels in.
        out_channels: Channels out.
        stride: The first convolution's (and the projection's) stride.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """The block's output.

        Args:
            x: (B, in_channels, H, W) features.
        """
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style CNN: a conv-BN-ReLU stem, three residual blocks, global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.relu = nn.ReLU()
        self.block1 = ResidualBlock(16, 16, 1)
        self.block2 = ResidualBlock(16, 32, 2)
        self.block3 = ResidualBlock(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores.

        Args:
            x: (B, 3, H, W) images.
        """
        x = self.block3(self.block2(self.block1(self.relu(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


class TextTransformer(nn.Module):
    """Token ids -> embedding + learned positions -> two encoder layers -> mean pool -> classes.

    Args:
        dim: Embedding width.
        heads: Attention heads.
        layers: Encoder layers.
    """

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, dim, padding_idx=PAD_TOKEN)
        self.positions = nn.Parameter(torch.randn(SEQUENCE_LENGTH, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 4)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Class scores.

        Args:
            tokens: (B, L) token ids, L at most 32.
            mask: (B, L), 1 for tokens and 0 for padding: the encoder then ignores the padding
                and the pool averages over the tokens only.
        """
        hidden = self.embedding(tokens) + self.positions[: tokens.shape[1]]
        if mask is None:
            return self.head(self.encoder(hidden).mean(dim=1))
        hidden = self.encoder(hidden, src_key_padding_mask=mask == 0)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return self.head((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1))


def seeded_model(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A model built under a fixed seed, its batch norms given statistics and affine
    parameters away from the identity (so that eval mode normalizes), in eval mode. Torch's
    global generator is left as it was.

    Args:
        make: Builds the model (random weights).
        seed: The seed it is built and its statistics drawn under.

    Returns:
        The model, in eval mode.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = make()
        # Non-trivial BatchNorm statistics, so eval mode is not an identity.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.1, 0.1)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def _perceptron(features: int, width: int, layers: int) -> nn.Sequential:
    named: OrderedDict[str, nn.Module] = OrderedDict()
    for index in range(1, layers + 1):
        last = index == layers
        named[f"fc{index}"] = nn.Linear(
            features if index == 1 else width, NUM_CLASSES if last else width
        )
        if not last:
            named[f"relu{index}"] = nn.ReLU()
    return nn.Sequential(named)


def mlp(features: int = MLP_FEATURES, width: int = 256, layers: int = 3) -> nn.Module:
    """A multilayer perceptron with 10 classes: linear layers ``fc1``, ``fc2``, ... with a
    ReLU (``relu1``, ...) between each two. By default 64-256-256-10.

    Args:
        features: Inputs per example.
        width: Width of the hidden layers.
        layers: Linear layers.
    """
    return seeded_model(lambda: _perceptron(features, width, layers), 0)


def cnn() -> nn.Module:
    """The seeded [fastattr.bench.models.SmallCNN][], in eval mode."""
    return seeded_model(SmallCNN, 1)


def resnet() -> nn.Module:
    """The seeded [fastattr.bench.models.SmallResNet][], in eval mode."""
    return seeded_model(SmallResNet, 2)


def transformer() -> nn.Module:
    """The seeded [fastattr.bench.models.TextTransformer][], in eval mode."""
    return seeded_model(TextTransformer, 3)


class HuggingFaceLogits(nn.Module):
    """A HuggingFace ``transformers`` model as the attribution classes take it: input
    embeddings (and an attention mask) in, a tensor of logits out, at one position for a
    language model.

    Args:
        model: a ``transformers`` model with a ``logits`` output.
        position: the position whose logits are returned, or None for all (a classifier's
            output has none).
    """

    def __init__(self, model: nn.Module, position: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.position = position
        # Language models take use_cache; off, so that no cache of activations is built.
        parameters = inspect.signature(model.forward).parameters
        self.options = {"use_cache": False} if "use_cache" in parameters else {}

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The logits.

        Args:
            inputs_embeds: (batch, tokens, hidden) input embeddings.
            attention_mask: (batch, tokens), 1 for tokens and 0 for padding, or None.
        """
        output = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **self.options
        )
        logits = output.logits
        return logits if self.position is None else logits[:, self.position]
