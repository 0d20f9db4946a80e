"""The user-scale benchmark suite: models of 1e5 to 2e6 parameters trained for hundreds to thousands of steps.

Each function returns a ``ModuleTaskSpec`` with held-out validation data disjoint from its training data. No
task, architecture or data source here is one the project meta-trains on (MNIST, Markov chains, generated
text, teacher–student regression, quadratics). Every default works offline and deterministically: the data
ship with Python or scikit-learn.

- Text: ``pydoc_data.topics`` (the English prose of Python's documentation topics, the text ``help()``
  shows; about 465,000 characters in Python 3.11) and the source code of a fixed list of pure-Python
  standard-library modules. Both ship with CPython, so their exact text is that of the interpreter running
  them. Text is read one character per token (``VOCABULARY``) and split by contiguous blocks: the first 90% is
  training text, the last 10% validation text. Users with internet can pass ``corpus="tiny_shakespeare"``
  (downloaded once into ``root`` with ``download=True``).
- Images: scikit-learn's bundled digits (1,797 8×8 images) and its two sample photographs (``china.jpg``,
  ``flower.jpg``, 427×640), split by a fixed seeded permutation of examples.

Every model is built from plain ``nn`` modules without dropout (recurrences are ``nn.Linear`` layers in a loop,
attention is written with matmul and softmax), so ``torch.func`` batches it over optimizees. Data are drawn
from the factories' own seeded generators, never torch's global RNG, which metaopt seeds per run to draw the
initialisation.
"""

from __future__ import annotations

import inspect
import math
import urllib.request
from collections.abc import Sequence
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.tasks.families import TransformerBlock, mlp, sequence_cross_entropy
from metaopt.tasks.module import ModuleTaskSpec

VALIDATION_FRACTION = 0.1
SPLIT_SEED = 0  # the seeded permutation that splits image examples into training and validation
# One token per character: 0 for any character outside this set (tabs, non-ASCII), 1 for a newline, then
# printable ASCII from the space to the tilde.
VOCABULARY = "\x00\n" + "".join(chr(code) for code in range(32, 127))
CHARACTER_IDS = {character: index for index, character in enumerate(VOCABULARY)}
# Pure-Python standard-library modules whose source is the code corpus (in this order).
CODE_MODULES = ("argparse", "difflib", "textwrap", "statistics", "fractions", "calendar", "shlex", "heapq", "string")
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# ----------------------------------------------------------------------------------------------------- text


def python_docs_text() -> str:
    """Python's documentation topics (``pydoc_data.topics``), in key order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def python_code_text(modules: Sequence[str] = CODE_MODULES) -> str:
    """The source code of ``modules`` (standard-library modules), concatenated in that order."""
    import importlib

    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in modules)


def text_corpus(corpus: str = "python_docs", root: str | Path = "data", download: bool = False) -> str:
    """A corpus by name: ``python_docs`` and ``python_code`` ship with Python; ``tiny_shakespeare`` (1.1 MB,
    Karpathy's char-rnn corpus) is read from ``root/tiny_shakespeare.txt``, fetched there first when
    ``download`` is true."""
    if corpus == "python_docs":
        return python_docs_text()
    if corpus == "python_code":
        return python_code_text()
    if corpus == "tiny_shakespeare":
        path = Path(root) / "tiny_shakespeare.txt"
        if not path.exists():
            if not download:
                raise FileNotFoundError(f"{path} is missing: pass download=True to fetch {TINY_SHAKESPEARE_URL}")
            path.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=60) as response:
                path.write_bytes(response.read())
        return path.read_text(encoding="utf-8")
    raise ValueError(f"unknown corpus {corpus!r}; allowed: python_docs, python_code, tiny_shakespeare")


def encode(text: str) -> Tensor:
    """Token ids [len(text)] (int64) of ``text`` under ``VOCABULARY``."""
    return torch.tensor([CHARACTER_IDS.get(character, 0) for character in text], dtype=torch.int64)


def split_blocks(ids: Tensor, validation_fraction: float = VALIDATION_FRACTION) -> tuple[Tensor, Tensor]:
    """The first ``1 - validation_fraction`` of ``ids`` (training) and the rest (validation): contiguous blocks."""
    boundary = len(ids) - int(round(validation_fraction * len(ids)))
    return ids[:boundary], ids[boundary:]


def windows(ids: Tensor, context: int, stride: int) -> tuple[Tensor, Tensor]:
    """Windows of ``context`` tokens starting every ``stride`` tokens, and the same windows shifted by one (the
    next token at every position): inputs and targets [N, context], int64, all within ``ids``."""
    spans = ids.unfold(0, context + 1, stride)
    return spans[:, :-1].contiguous(), spans[:, 1:].contiguous()


def token_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """The fraction of positions whose most likely next token is the target."""
    return (logits.argmax(-1) == targets).float().mean()


def _language_model(text: str, model, context: int, stride: int) -> ModuleTaskSpec:
    """Next-character prediction: training windows every ``stride`` characters of the training block,
    validation windows every ``context`` characters (not overlapping) of the validation block."""
    training, validation = split_blocks(encode(text))
    inputs, targets = windows(training, context, stride)
    validation_inputs, validation_targets = windows(validation, context, context)
    return ModuleTaskSpec(
        model=model,
        inputs=inputs,
        targets=targets,
        loss=sequence_cross_entropy,
        validation_inputs=validation_inputs,
        validation_targets=validation_targets,
        metric=token_accuracy,
    )


class TransformerLanguageModel(nn.Module):
    """A decoder-only transformer: token and learned position embeddings, ``layers`` pre-norm blocks (causal
    self-attention, then a GELU MLP of width 4·d_model), a final layer norm and next-token logits."""

    def __init__(self, vocab: int, context: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(context, d_model))
        self.blocks = nn.ModuleList(TransformerBlock(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.token(tokens) + self.position[: tokens.shape[-1]]
        for block in self.blocks:
            hidden = block(hidden)
        return self.readout(self.norm(hidden))


def text_transformer_lm(
    d_model: int = 128,
    heads: int = 4,
    layers: int = 3,
    context: int = 64,
    stride: int = 16,
    corpus: str = "python_docs",
    root: str | Path = "data",
    download: bool = False,
) -> ModuleTaskSpec:
    """A character-level transformer language model (3 layers, width 128, 4 heads, 64 characters of context)
    on real English prose: Python's documentation topics (``text_corpus``).

    Split: the first 90% of the text trains (windows every ``stride`` characters), the last 10% validates
    (non-overlapping windows). Inputs: token windows [N, context]; targets: the next token at every position;
    loss: cross-entropy over all positions; metric: next-token accuracy."""
    model = partial(TransformerLanguageModel, len(VOCABULARY), context, d_model, heads, layers)
    return _language_model(text_corpus(corpus, root, download), model, context, stride)


class LSTMLanguageModel(nn.Module):
    """Embeddings, one LSTM layer written as ``nn.Linear`` layers in a loop over positions (its forget gate's bias
    starts at 1), and next-token logits from every hidden state."""

    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.embedding = nn.Embedding(vocab, embed)
        self.input = nn.Linear(embed, 4 * hidden)
        self.recurrent = nn.Linear(hidden, 4 * hidden, bias=False)
        self.readout = nn.Linear(hidden, vocab)
        with torch.no_grad():
            self.input.bias[hidden : 2 * hidden] += 1.0

    def forward(self, tokens: Tensor) -> Tensor:
        gates = self.input(self.embedding(tokens))  # [..., length, 4 · hidden]: every position at once
        state = cell = gates.new_zeros(*tokens.shape[:-1], self.hidden)
        states = []
        for step in gates.unbind(-2):
            i, f, g, o = (step + self.recurrent(state)).chunk(4, -1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            state = torch.sigmoid(o) * torch.tanh(cell)
            states.append(state)
        return self.readout(torch.stack(states, -2))


def text_lstm_lm(
    embed: int = 64,
    hidden: int = 256,
    context: int = 64,
    stride: int = 16,
    corpus: str = "python_docs",
    root: str | Path = "data",
    download: bool = False,
) -> ModuleTaskSpec:
    """A character-level LSTM language model (one layer of 256 units, embeddings of 64) on Python's documentation
    topics; data, split, loss and metric as ``text_transformer_lm``'s."""
    model = partial(LSTMLanguageModel, len(VOCABULARY), embed, hidden)
    return _language_model(text_corpus(corpus, root, download), model, context, stride)


class GRULanguageModel(nn.Module):
    """Embeddings, one GRU layer written as ``nn.Linear`` layers in a loop over positions, next-token logits."""

    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.embedding = nn.Embedding(vocab, embed)
        self.input = nn.Linear(embed, 3 * hidden)
        self.recurrent = nn.Linear(hidden, 3 * hidden)
        self.readout = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        inputs = self.input(self.embedding(tokens))
        state = inputs.new_zeros(*tokens.shape[:-1], self.hidden)
        states = []
        for step in inputs.unbind(-2):
            x_reset, x_update, x_new = step.chunk(3, -1)
            h_reset, h_update, h_new = self.recurrent(state).chunk(3, -1)
            update = torch.sigmoid(x_update + h_update)
            new = torch.tanh(x_new + torch.sigmoid(x_reset + h_reset) * h_new)
            state = (1 - update) * new + update * state
            states.append(state)
        return self.readout(torch.stack(states, -2))


@lru_cache(maxsize=4)
def pretrained_gru(
    embed: int, hidden: int, context: int, steps: int, batch_size: int, lr: float, seed: int
) -> dict[str, Tensor]:
    """The state of a ``GRULanguageModel`` trained with AdamW for ``steps`` steps on the training block of
    Python's documentation topics (windows every ``context // 4`` characters, minibatches and initialisation
    drawn from ``seed``), computed once per process and configuration."""
    training, _ = split_blocks(encode(python_docs_text()))
    inputs, targets = windows(training, context, max(1, context // 4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GRULanguageModel(len(VOCABULARY), embed, hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(inputs), (batch_size,), generator=generator)
        loss = sequence_cross_entropy(model(inputs[index]), targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def code_finetune_gru(
    embed: int = 64,
    hidden: int = 192,
    context: int = 64,
    stride: int = 16,
    pretrain_steps: int = 400,
    pretrain_batch_size: int = 32,
    pretrain_lr: float = 3e-3,
    pretrain_seed: int = 0,
) -> ModuleTaskSpec:
    """Fine-tuning: a character-level GRU language model (192 units) pretrained on English prose (Python's
    documentation topics, ``pretrained_gru``: AdamW, ``pretrain_steps`` steps, fixed seed, cached in-process),
    then trained on Python source code (``python_code_text``: the standard-library modules ``CODE_MODULES``).

    Every run starts from the pretrained weights (the initialisation ``model()`` draws is overwritten), so runs
    differ in their minibatches. Split of the code: the first 90% trains, the last 10% validates, as
    ``text_transformer_lm``'s; the prose it was pretrained on is another corpus."""
    state = pretrained_gru(embed, hidden, context, pretrain_steps, pretrain_batch_size, pretrain_lr, pretrain_seed)

    def model() -> nn.Module:
        module = GRULanguageModel(len(VOCABULARY), embed, hidden)
        module.load_state_dict(state)
        return module

    return _language_model(python_code_text(), model, context, stride)


# --------------------------------------------------------------------------------------------------- images


def seeded_split(count: int, validation_fraction: float, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Indices of training and validation examples: a permutation of ``range(count)`` drawn from ``seed``,
    its last ``validation_fraction`` validating."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(count))
    boundary = count - int(round(validation_fraction * count))
    return order[:boundary], order[boundary:]


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """The fraction of examples whose most likely class is the label."""
    return (logits.argmax(-1) == labels).float().mean()


def _classification(inputs: Tensor, labels: Tensor, model, validation_fraction: float) -> ModuleTaskSpec:
    training, validation = seeded_split(len(inputs), validation_fraction)
    return ModuleTaskSpec(
        model=model,
        inputs=inputs[training],
        targets=labels[training],
        loss=F.cross_entropy,
        validation_inputs=inputs[validation],
        validation_targets=labels[validation],
        metric=accuracy,
    )


@lru_cache(maxsize=1)
def _sample_photo_arrays() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def sample_photos() -> list[Tensor]:
    """scikit-learn's two sample photographs (``china.jpg``, ``flower.jpg``), float RGB in [0, 1], [3, 427, 640]
    (decoded once per process)."""
    return [torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255.0) for image in _sample_photo_arrays()]


def photo_patches(patch: int) -> Tensor:
    """Every non-overlapping ``patch``×``patch`` tile of both photographs, [N, 3, patch, patch]."""
    tiles = []
    for image in sample_photos():
        grid = image.unfold(1, patch, patch).unfold(2, patch, patch)  # [3, rows, columns, patch, patch]
        tiles.append(grid.permute(1, 2, 0, 3, 4).reshape(-1, 3, patch, patch))
    return torch.cat(tiles)


def psnr(outputs: Tensor, targets: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in decibels of colours in [0, 1]: 10·log10(1 / mean squared error)."""
    return -10.0 * torch.log10(F.mse_loss(outputs, targets))


def dihedral_views(tiles: Tensor) -> Tensor:
    """Each tile and its mirror image, each turned by 0, 90, 180 and 270 degrees: 8 views per tile, in tile order."""
    mirrored = torch.stack([tiles, tiles.flip(-1)], 1)  # [N, 2, 3, patch, patch]
    views = torch.stack([mirrored.rot90(turn, (-2, -1)) for turn in range(4)], 2)  # [N, 2, 4, 3, patch, patch]
    return views.flatten(0, 2).contiguous()


class DenoisingCNN(nn.Module):
    """DnCNN (Zhang et al., 2017): 3×3 convolutions, the inner ones with batch norm, all but the last with ReLU,
    predict the noise of an image; the output is the image minus it."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.noise = nn.Sequential(*layers, nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, noisy: Tensor) -> Tensor:
        return noisy - self.noise(noisy)


def photo_denoising_cnn(
    width: int = 48,
    depth: int = 8,
    patch: int = 16,
    noise: float = 0.1,
    validation_fraction: float = VALIDATION_FRACTION,
) -> ModuleTaskSpec:
    """Denoising photographs: a CNN with batch norm (``DenoisingCNN``: 8 layers of width 48) restores 16×16 tiles
    of scikit-learn's two sample photos (2,080 non-overlapping tiles, 8 views each: ``dihedral_views``) from
    copies with Gaussian noise of standard deviation ``noise`` (0.1, drawn once from a fixed seed); squared
    error, metric PSNR.

    Split: a permutation of the tiles drawn from ``SPLIT_SEED``, its last 10% validating; all 8 views of a tile
    are on the same side. Inputs: noisy tiles [N, 3, patch, patch]; targets: the clean tiles, in [0, 1]."""
    tiles = photo_patches(patch)
    training, validation = seeded_split(len(tiles), validation_fraction)
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    clean = dihedral_views(tiles[training]), dihedral_views(tiles[validation])
    noisy = [views + noise * torch.randn(views.shape, generator=generator) for views in clean]
    return ModuleTaskSpec(
        model=partial(DenoisingCNN, width, depth),
        inputs=noisy[0],
        targets=clean[0],
        loss=F.mse_loss,
        validation_inputs=noisy[1],
        validation_targets=clean[1],
        metric=psnr,
    )


class MixerBlock(nn.Module):
    """An MLP-Mixer block: a GELU MLP across tokens, then one across channels, each pre-norm with a residual."""

    def __init__(self, tokens: int, channels: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.token_norm = nn.LayerNorm(channels)
        self.token_mlp = mlp([tokens, token_hidden, tokens], "gelu")
        self.channel_norm = nn.LayerNorm(channels)
        self.channel_mlp = mlp([channels, channel_hidden, channels], "gelu")

    def forward(self, hidden: Tensor) -> Tensor:  # [..., tokens, channels]
        hidden = hidden + self.token_mlp(self.token_norm(hidden).transpose(-1, -2)).transpose(-1, -2)
        return hidden + self.channel_mlp(self.channel_norm(hidden))


class MLPMixer(nn.Module):
    """MLP-Mixer (Tolstikhin et al., 2021): non-overlapping patches embedded linearly, Mixer blocks, a layer
    norm, mean pooling over patches and a linear read-out."""

    def __init__(
        self, image: int, patch: int, channels: int, layers: int, token_hidden: int, channel_hidden: int, classes: int
    ):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = patch
        self.embed = nn.Linear(patch * patch, channels)
        self.blocks = nn.Sequential(
            *(MixerBlock(tokens, channels, token_hidden, channel_hidden) for _ in range(layers))
        )
        self.norm = nn.LayerNorm(channels)
        self.readout = nn.Linear(channels, classes)

    def forward(self, images: Tensor) -> Tensor:  # [..., image, image]
        p = self.patch
        *batch, height, width = images.shape
        patches = images.reshape(*batch, height // p, p, width // p, p).transpose(-3, -2)
        hidden = self.embed(patches.reshape(*batch, (height // p) * (width // p), p * p))
        return self.readout(self.norm(self.blocks(hidden)).mean(-2))


def digits_mixer(
    channels: int = 128,
    layers: int = 4,
    patch: int = 2,
    token_hidden: int = 64,
    channel_hidden: int = 256,
    validation_fraction: float = 0.2,
) -> ModuleTaskSpec:
    """An MLP-Mixer (4 blocks, 128 channels, 2×2 patches: 16 tokens) classifying scikit-learn's handwritten
    digits (1,797 images of 8×8 pixels, 10 classes; none repeats).

    Split: a permutation of the images drawn from ``SPLIT_SEED``, its last 20% validating (359 images).
    Inputs [N, 8, 8], pixels scaled from 0..16 to 0..1 and centred on the training images' mean."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    training, _ = seeded_split(len(images), validation_fraction)
    images = images - images[training].mean(0)
    model = partial(MLPMixer, 8, patch, channels, layers, token_hidden, channel_hidden, 10)
    return _classification(images, labels, model, validation_fraction)


class FourierFeatures(nn.Module):
    """Coordinates [..., 2] in [-1, 1] and their sines and cosines at frequencies 2^k·π, k < ``octaves`` (no
    parameters: NeRF's positional encoding)."""

    def __init__(self, octaves: int):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(octaves, dtype=torch.float32))

    def forward(self, coordinates: Tensor) -> Tensor:
        angles = (coordinates[..., None] * self.frequencies).flatten(-2)
        return torch.cat([coordinates, angles.sin(), angles.cos()], -1)


def photo_coordinate_mlp(
    width: int = 256, depth: int = 5, octaves: int = 8, downsample: int = 2, validation_fraction: float = 0.1
) -> ModuleTaskSpec:
    """Fit a photograph as a function: a deep ReLU MLP without normalisation (5 hidden layers of 256) maps a
    pixel's coordinates (``FourierFeatures``, 8 octaves) to its colour (squared error; metric: PSNR).

    Data: scikit-learn's ``china.jpg`` averaged over ``downsample``² blocks (213×320 = 68,160 pixels);
    inputs: coordinates [N, 2] in [-1, 1]; targets: RGB [N, 3] in [0, 1]. Split: a permutation of the pixels
    drawn from ``SPLIT_SEED``, its last 10% validating (colours at held-out positions: interpolation)."""
    image = F.avg_pool2d(sample_photos()[0][None], downsample)[0]
    _, height, width_pixels = image.shape
    rows, columns = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width_pixels), indexing="ij")
    coordinates = torch.stack([rows, columns], -1).reshape(-1, 2)
    colours = image.permute(1, 2, 0).reshape(-1, 3).contiguous()
    training, validation = seeded_split(len(colours), validation_fraction)

    def model() -> nn.Module:
        sizes = [2 + 4 * octaves, *[width] * depth, 3]
        return nn.Sequential(FourierFeatures(octaves), mlp(sizes, "relu"))

    return ModuleTaskSpec(
        model=model,
        inputs=coordinates[training],
        targets=colours[training],
        loss=F.mse_loss,
        validation_inputs=coordinates[validation],
        validation_targets=colours[validation],
        metric=psnr,
    )
