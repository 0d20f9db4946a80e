"""Task families for meta-training: each builder returns a ``ModuleTaskSpec`` for one concrete configuration.

The config code samples a configuration (sizes, activation, data seed) and calls a builder with it. Data are
drawn from the builder's own seeded generators, never torch's global RNG: that one is what ``ModuleTask``
seeds for each optimizee's initialisation, which is PyTorch's default one for every module here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.tasks.module import ModuleTaskSpec

NUM_CLASSES = 10
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def activation_module(name: str) -> nn.Module:
    """The activation layer called ``name``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers through ``sizes`` with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), activation_module(activation)]
    return nn.Sequential(*layers[:-1])


def scaled_images(images: Tensor, image_size: int) -> Tensor:
    """uint8 images [N, H, W] as float pixels in [0, 1], [N, 1, image_size, image_size] (area-averaged)."""
    pixels = images.unsqueeze(1).float().div(255.0)
    return pixels if pixels.shape[-2:] == (image_size, image_size) else F.adaptive_avg_pool2d(pixels, image_size)


def image_mlp(
    images: Tensor, labels: Tensor, image_size: int = 28, hidden_sizes: Sequence[int] = (32,), activation: str = "relu"
) -> ModuleTaskSpec:
    """An MLP classifying ``images`` (uint8 [N, 28, 28], e.g. MNIST) downsampled to ``image_size``², flattened."""
    pixels = scaled_images(images, image_size).flatten(1)
    model = partial(mlp, [image_size * image_size, *hidden_sizes, NUM_CLASSES], activation)
    return ModuleTaskSpec(model=model, inputs=pixels, targets=labels.long(), loss=F.cross_entropy)


def conv_net(image_size: int, channels: Sequence[int], activation: str) -> nn.Sequential:
    """3×3 convolutions of stride 2 through ``channels``, then a linear read-out of the flattened feature map."""
    layers: list[nn.Module] = []
    in_channels, size = 1, image_size
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), activation_module(activation)]
        in_channels, size = out_channels, (size + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(in_channels * size * size, NUM_CLASSES))


def image_cnn(
    images: Tensor, labels: Tensor, image_size: int = 8, channels: Sequence[int] = (8, 16), activation: str = "relu"
) -> ModuleTaskSpec:
    """A small conv net classifying ``images`` (uint8 [N, 28, 28]) downsampled to ``image_size``²."""
    model = partial(conv_net, image_size, tuple(channels), activation)
    return ModuleTaskSpec(
        model=model, inputs=scaled_images(images, image_size), targets=labels.long(), loss=F.cross_entropy
    )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees itself and the positions before it.

    Written with matmul and softmax rather than ``scaled_dot_product_attention``: its CPU kernel has no vmap
    batching rule and no double backward, which meta-training through the optimizee's gradient needs.
    """

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        head_size = d_model // self.heads
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, head_size)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, length, head_size]
        scores = query @ key.transpose(-2, -1) / math.sqrt(head_size)
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        attended = scores.masked_fill(future, float("-inf")).softmax(-1) @ value
        return self.out(attended.transpose(1, 2).reshape(batch, length, d_model))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU MLP of width 4·d_model."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, heads)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = mlp([d_model, 4 * d_model, d_model], "gelu")

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CausalTransformer(nn.Module):
    """A tiny decoder-only transformer: token and position embeddings, blocks, a final norm, next-token logits."""

    def __init__(self, vocab: int, length: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(length, d_model)
        self.blocks = nn.Sequential(*(TransformerBlock(d_model, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        return self.readout(self.norm(self.blocks(self.token(tokens) + self.position(positions))))


def sequence_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position of logits [..., vocab] against targets [...]."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def markov_sequences(seed: int, vocab: int, length: int, examples: int) -> Tensor:
    """Token sequences [examples, length + 1] of a random first-order Markov chain drawn from ``seed``.

    Each state moves to one of ``max(2, vocab // 4)`` random successors with Dirichlet(1) probabilities, so the
    next token is predictable; the first token is uniform.
    """
    rng = np.random.default_rng(seed)
    successors = max(2, vocab // 4)
    transitions = np.zeros((vocab, vocab))
    for row in transitions:
        row[rng.choice(vocab, successors, replace=False)] = rng.dirichlet(np.ones(successors))
    cumulative = transitions.cumsum(1)
    cumulative[:, -1] = 1.0
    tokens = np.empty((examples, length + 1), dtype=np.int64)
    tokens[:, 0] = rng.integers(0, vocab, examples)
    for t in range(length):
        uniform = rng.random(examples)
        tokens[:, t + 1] = (cumulative[tokens[:, t]] <= uniform[:, None]).sum(1)
    return torch.from_numpy(tokens)


def markov_transformer(
    seed: int,
    vocab: int = 8,
    length: int = 16,
    d_model: int = 16,
    heads: int = 2,
    layers: int = 1,
    examples: int = 2048,
) -> ModuleTaskSpec:
    """Next-token prediction on sequences of a random Markov chain (drawn from ``seed``) by a causal transformer.

    inputs: tokens [examples, length]; targets: each position's next token [examples, length].
    """
    tokens = markov_sequences(seed, vocab, length, examples)
    return ModuleTaskSpec(
        model=partial(CausalTransformer, vocab, length, d_model, heads, layers),
        inputs=tokens[:, :-1].contiguous(),
        targets=tokens[:, 1:].contiguous(),
        loss=sequence_cross_entropy,
    )


WORDS: dict[str, tuple[str, ...]] = {
    "determiner": ("the", "a", "this", "that", "every", "some", "my", "our", "one", "no"),
    "adjective": (
        *("small", "big", "old", "young", "red", "green", "quiet", "happy", "dark", "bright", "cold", "warm"),
        *("empty", "angry", "kind", "tall"),
    ),
    "noun": (
        *("dog", "cat", "man", "woman", "child", "house", "tree", "river", "city", "book", "car", "bird", "friend"),
        *("teacher", "garden", "road", "apple", "island", "window", "letter"),
    ),
    "transitive": ("saw", "found", "liked", "took", "made", "kept", "watched", "followed", "helped", "painted"),
    "intransitive": ("slept", "ran", "smiled", "waited", "laughed", "walked", "sang", "fell"),
    "adverb": ("slowly", "quickly", "often", "never", "always", "quietly", "today", "again"),
    "preposition": ("in", "on", "near", "under", "behind", "with", "over", "by"),
    "name": ("Anna", "Tom", "Maria", "John", "Sara", "Peter"),
    "pronoun": ("he", "she", "they", "we", "you"),
    "conjunction": ("and", "but", "so", "because", "while"),
}
SENTENCE_STARTERS = (*WORDS["determiner"], "an", *WORDS["name"], *WORDS["pronoun"])
PUNCTUATION = " ,.!"
VOCABULARY = "".join(
    sorted(
        set("".join(word for words in WORDS.values() for word in words))
        | {word[0].upper() for word in SENTENCE_STARTERS}
        | set(PUNCTUATION)
    )
)
CHARACTER_IDS = {character: index for index, character in enumerate(VOCABULARY)}


class TextGrammar:
    """A small probabilistic grammar of English sentences; ``seed`` draws the choices and each category's
    Zipf-like word frequencies (which word is common differs between seeds)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.frequencies = {}
        for category, words in WORDS.items():
            weights = 1.0 / (self.rng.permutation(len(words)) + 1)
            self.frequencies[category] = weights / weights.sum()

    def word(self, category: str) -> str:
        words = WORDS[category]
        return words[self.rng.choice(len(words), p=self.frequencies[category])]

    def chance(self, probability: float) -> bool:
        return self.rng.random() < probability

    def noun_phrase(self) -> list[str]:
        determiner = self.word("determiner")
        nominal = [self.word("adjective")] if self.chance(0.4) else []
        nominal.append(self.word("noun"))
        if determiner == "a" and nominal[0][0] in "aeiou":
            determiner = "an"
        return [determiner, *nominal]

    def subject(self) -> list[str]:
        draw = self.rng.random()
        if draw < 0.6:
            return self.noun_phrase()
        return [self.word("name" if draw < 0.8 else "pronoun")]

    def clause(self) -> list[str]:
        words = self.subject()
        if self.chance(0.6):
            words += [self.word("transitive"), *(self.noun_phrase() if self.chance(0.8) else [self.word("name")])]
        else:
            words.append(self.word("intransitive"))
        if self.chance(0.3):
            words += [self.word("preposition"), *self.noun_phrase()]
        if self.chance(0.2):
            words.append(self.word("adverb"))
        return words

    def sentence(self) -> str:
        words = self.clause()
        if self.chance(0.25):
            words[-1] += ","
            words += [self.word("conjunction"), *self.clause()]
        text = " ".join(words) + ("!" if self.chance(0.1) else ".")
        return text[0].upper() + text[1:]


def generated_text(seed: int, characters: int) -> str:
    """``characters`` characters of English-like sentences from ``TextGrammar(seed)``, separated by spaces."""
    grammar = TextGrammar(seed)
    sentences: list[str] = []
    joined_length = -1  # of " ".join(sentences)
    while joined_length < characters:
        sentences.append(grammar.sentence())
        joined_length += len(sentences[-1]) + 1
    return " ".join(sentences)[:characters]


def character_mlp(context: int, embed: int, hidden: int) -> nn.Sequential:
    """Bengio-style language model: embeddings of ``context`` characters, concatenated, a tanh layer, logits."""
    vocab = len(VOCABULARY)
    return nn.Sequential(
        nn.Embedding(vocab, embed),
        nn.Flatten(),
        nn.Linear(context * embed, hidden),
        nn.Tanh(),
        nn.Linear(hidden, vocab),
    )


def char_lm(seed: int, context: int = 8, embed: int = 8, hidden: int = 64, characters: int = 20000) -> ModuleTaskSpec:
    """Next-character prediction on ``generated_text(seed, characters)`` from the ``context`` characters before.

    inputs: character ids [characters - context, context] (ids index ``VOCABULARY``); targets: the next id.
    """
    ids = torch.tensor([CHARACTER_IDS[character] for character in generated_text(seed, characters)])
    windows = ids.unfold(0, context + 1, 1)
    return ModuleTaskSpec(
        model=partial(character_mlp, context, embed, hidden),
        inputs=windows[:, :-1].contiguous(),
        targets=windows[:, -1].contiguous(),
        loss=F.cross_entropy,
    )


def teacher_student(
    seed: int,
    input_dim: int = 16,
    teacher_hidden: int = 32,
    hidden_sizes: Sequence[int] = (32,),
    activation: str = "relu",
    examples: int = 2048,
    noise: float = 0.1,
) -> ModuleTaskSpec:
    """Regression of a random teacher by a student MLP, mean squared error.

    Inputs are N(0, 1) [examples, input_dim]; the teacher, one hidden layer of ``teacher_hidden`` units with the
    student's activation and N(0, 1/fan_in) weights drawn from ``seed``, gives targets [examples, 1] scaled to
    zero mean and unit variance, plus N(0, ``noise``²) noise: ``noise``² is the loss a perfect student reaches.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(examples, input_dim, generator=generator)
    hidden_weight = torch.randn(input_dim, teacher_hidden, generator=generator) / math.sqrt(input_dim)
    hidden_bias = torch.randn(teacher_hidden, generator=generator)
    readout = torch.randn(teacher_hidden, 1, generator=generator) / math.sqrt(teacher_hidden)
    teacher = activation_module(activation)(inputs @ hidden_weight + hidden_bias) @ readout
    targets = (teacher - teacher.mean()) / teacher.std() + noise * torch.randn(examples, 1, generator=generator)
    return ModuleTaskSpec(
        model=partial(mlp, [input_dim, *hidden_sizes, 1], activation), inputs=inputs, targets=targets, loss=F.mse_loss
    )
