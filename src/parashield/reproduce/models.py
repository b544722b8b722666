"""Small, real models for the experiments, in plain PyTorch.

All models are sized to train on a 2-core CPU and are safe for second-order autograd
(Hessian-vector products via ``torch.autograd.grad(..., create_graph=True)``) in eval and train
mode, which the library relies on:

- ``MLP``: fully connected classifier (8x8 digits demo).
- ``ResNet``: small CIFAR-style ResNet (BasicBlock, BatchNorm, 1x1 projection shortcuts, global
  average pooling) for 28x28 images (Fashion-MNIST).
- ``LSTMLanguageModel``: word-level LSTM language model (Penn Treebank), optional tied weights.
- ``TransformerTranslator``: encoder-decoder Transformer with sinusoidal positions, padding and
  causal masks, and batched greedy decoding (English-Spanish).
- ``TextClassifier``: bag-of-embeddings (fastText-style) classifier (BBC News).

Two kernels in PyTorch have no double backward, so these models avoid them by default:
``F.embedding_bag`` (``TextClassifier`` uses an equivalent embedding + segment reduction unless
``fused=True``) and the fused CPU/CUDA attention kernels (``TransformerTranslator`` runs attention
with the math backend of ``scaled_dot_product_attention``). The cuDNN LSTM has no double backward
and no backward in eval mode, so ``LSTMLanguageModel`` turns cuDNN off where it would fail.

``build_model(name, **kwargs)`` builds any of them by name (see ``MODELS``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_sdpa() -> ContextManager[None]:
        return sdpa_kernel(SDPBackend.MATH)

except ImportError:  # pragma: no cover - older torch

    def _math_sdpa() -> ContextManager[None]:
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )

__all__ = [
    "MLP",
    "MODELS",
    "LSTMLanguageModel",
    "ResNet",
    "BasicBlock",
    "TextClassifier",
    "TransformerTranslator",
    "build_model",
    "count_parameters",
    "detach_hidden",
]

Hidden = Union[Tensor, tuple["Hidden", ...], list["Hidden"]]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (distinct) parameter elements; tied parameters are counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected classifier: flatten -> [Linear -> activation -> dropout] * len(hidden) ->
    Linear. Input (B, *) with prod(*) == in_features; output logits (B, num_classes)."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 64),
        num_classes: int = 10,
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_features <= 0 or num_classes <= 0 or any(h <= 0 for h in hidden):
            raise ValueError("in_features, num_classes and hidden sizes must be positive")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        layers: list[nn.Module] = []
        width = self.in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, self.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, *) -> logits (B, num_classes)."""
        return self.net(x.reshape(x.shape[0], -1))


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Standard (post-activation) ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the
    identity, or a 1x1 conv + BN projection when the stride or the width changes; then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Small CIFAR-style ResNet for 28x28 (or 32x32) images.

    Stem conv3x3(in_channels -> widths[0]) + BN + ReLU, then one stage per width with
    ``blocks_per_stage`` BasicBlocks (the first block of every stage after the first has stride
    2: 28 -> 28 -> 14 -> 7), global average pooling and a linear classifier.
    Input (B, in_channels, H, W); output logits (B, num_classes). With the defaults
    (widths (16, 32, 64), one block per stage) it has about 0.08M parameters; with two blocks per
    stage (ResNet-14 style) about 0.18M.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        if not widths or blocks_per_stage < 1:
            raise ValueError("widths must be non-empty and blocks_per_stage >= 1")
        self.num_classes = int(num_classes)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        width = int(widths[0])
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(width, int(w), stride))
                width = int(w)
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        out = self.layers(self.stem(x))
        return self.fc(out.mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head for 28x28 grey images: conv3x3(1->c1)-BN-ReLU-maxpool,
    conv3x3(c1->c2)-BN-ReLU-maxpool, dropout, linear(c2*7*7 -> num_classes). With the default
    widths (16, 32) it has 20.5k parameters and reaches about 90% test accuracy on
    Fashion-MNIST in 10 epochs on the full training set."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (16, 32),
                 dropout: float = 0.1) -> None:
        super().__init__()
        c1, c2 = (int(w) for w in widths)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * 7 * 7, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, 28, 28) -> logits (B, num_classes)."""
        return self.head(self.features(x))


# --------------------------------------------------------------------------------------------
# LSTM language model
# --------------------------------------------------------------------------------------------


def detach_hidden(hidden: Hidden) -> Hidden:
    """Detach a hidden state (a tensor, or nested tuples/lists of tensors) from its history,
    for truncated backpropagation through time."""
    if isinstance(hidden, Tensor):
        return hidden.detach()
    return type(hidden)(detach_hidden(h) for h in hidden)


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM language model (as in PyTorch's word_language_model example).

    embedding(vocab_size, emb) -> dropout -> LSTM(emb, hidden, layers, dropout between layers)
    -> dropout -> Linear(hidden, vocab_size). Sequence-first: ``forward(input (T, B), hidden)``
    returns ``(logits (T, B, vocab_size), (h, c))`` with h and c of shape (layers, B, hidden).
    ``tie_weights=True`` shares the embedding and output weights (needs emb == hidden).

    cuDNN's LSTM has no double backward and no backward in eval mode; on CUDA this model runs
    the native LSTM kernel in eval mode when gradients are enabled (where the library takes
    Hessian-vector products), and always when ``cudnn=False``.
    """

    def __init__(
        self,
        vocab_size: int,
        emb: int = 200,
        hidden: int = 200,
        layers: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = False,
        cudnn: bool = True,
    ) -> None:
        super().__init__()
        if tie_weights and emb != hidden:
            raise ValueError(
                f"tie_weights=True needs emb == hidden (got emb={emb}, hidden={hidden})"
            )
        if layers < 1:
            raise ValueError("layers must be >= 1")
        self.vocab_size = int(vocab_size)
        self.emb_size = int(emb)
        self.hidden_size = int(hidden)
        self.num_layers = int(layers)
        self.tie_weights = bool(tie_weights)
        self.cudnn = bool(cudnn)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab_size)
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def init_hidden(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Zero (h, c), each (layers, batch_size, hidden), on the model's device and dtype."""
        w = self.decoder.bias
        shape = (self.num_layers, batch_size, self.hidden_size)
        return w.new_zeros(shape), w.new_zeros(shape)

    def forward(
        self, input: Tensor, hidden: Optional[tuple[Tensor, Tensor]] = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """input (T, B) token ids -> (logits (T, B, vocab_size), (h, c))."""
        if input.dim() != 2:
            raise ValueError(f"input must be (T, B) token ids, got shape {tuple(input.shape)}")
        if hidden is None:
            hidden = self.init_hidden(input.shape[1])
        x = self.drop(self.encoder(input))
        use_cudnn = self.cudnn and (self.training or not torch.is_grad_enabled())
        if x.is_cuda and not use_cudnn:
            with torch.backends.cudnn.flags(enabled=False):
                out, hidden = self.rnn(x, hidden)
        else:
            out, hidden = self.rnn(x, hidden)
        return self.decoder(self.drop(out)), hidden


# --------------------------------------------------------------------------------------------
# Transformer translator
# --------------------------------------------------------------------------------------------


@contextmanager
def _plain_attention() -> Iterator[None]:
    """Run attention with ordinary, twice-differentiable ops: the math backend of
    ``scaled_dot_product_attention`` (the fused flash / memory-efficient kernels have no double
    backward) and no fused "fast path" of nn.MultiheadAttention / nn.TransformerEncoderLayer
    (taken in eval mode without gradients), so eval-mode outputs are computed by the same ops
    with and without gradients (consistent losses under tiny parameter corruptions)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - old torch
        with _math_sdpa():
            yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with _math_sdpa():
            yield
    finally:
        mha.set_fastpath_enabled(previous)


def _heads(mha: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """(B, S, d) -> (B, heads, S, d / heads)."""
    return x.view(x.shape[0], x.shape[1], mha.num_heads, -1).transpose(1, 2)


def _project_kv(mha: nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of ``x`` (B, S, d) under a batch-first ``nn.MultiheadAttention`` with a
    packed input projection, split into heads."""
    d, w, b = mha.embed_dim, mha.in_proj_weight, mha.in_proj_bias
    k = F.linear(x, w[d : 2 * d], None if b is None else b[d : 2 * d])
    v = F.linear(x, w[2 * d :], None if b is None else b[2 * d :])
    return _heads(mha, k), _heads(mha, v)


def _attend(mha: nn.MultiheadAttention, x: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``mha(x, ., .)`` for queries ``x`` (B, T, d) given projected keys/values (``mask`` True
    where attending is allowed)."""
    d, w, b = mha.embed_dim, mha.in_proj_weight, mha.in_proj_bias
    q = _heads(mha, F.linear(x, w[:d], None if b is None else b[:d]))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=mha.dropout if mha.training else 0.0)
    return mha.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], d))


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal positions of Vaswani et al. to (B, T, d_model) inputs."""

    def __init__(self, d_model: int, max_len: int = 256) -> None:
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        steps = torch.arange(0, d_model, 2, dtype=torch.float32)
        div = torch.exp(steps * (-math.log(1e4) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)
        self.max_len = max_len

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x`` (B, T, d_model) at positions ``offset .. offset + T - 1``."""
        t = offset + x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        return x + self.pe[offset:t].to(x.dtype)


class TransformerTranslator(nn.Module):
    """Encoder-decoder Transformer for translation (batch first).

    Token embeddings (scaled by sqrt(d_model)) + sinusoidal positions -> ``layers`` encoder and
    ``layers`` decoder layers (pre-LayerNorm by default, with a final LayerNorm) -> Linear to the
    target vocabulary. Padding (``pad_id``) is masked in the source and target, and the decoder
    self-attention is causal. ``forward(src (B, S), tgt_in (B, T)) -> logits (B, T, tgt_vocab)``,
    where ``tgt_in`` starts with ``bos_id`` (teacher forcing). Attention runs on the math backend
    of ``scaled_dot_product_attention`` and never on PyTorch's fused inference fast path (the
    fused kernels have no double backward, and the fast path would make eval-mode outputs
    depend slightly on whether gradients are enabled).
    ``tie_output=True`` shares the target embedding and output weights.
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        d_model: int = 128,
        nhead: int = 4,
        layers: int = 2,
        dim_ff: int = 256,
        dropout: float = 0.1,
        max_len: int = 256,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        norm_first: bool = True,
        tie_output: bool = False,
    ) -> None:
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        if len({pad_id, bos_id, eos_id}) != 3:
            raise ValueError("pad_id, bos_id and eos_id must be distinct")
        self.src_vocab, self.tgt_vocab = int(src_vocab), int(tgt_vocab)
        self.d_model, self.max_len = int(d_model), int(max_len)
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id)
        for e in (self.src_embed, self.tgt_embed):
            nn.init.normal_(e.weight, 0.0, d_model**-0.5)
            with torch.no_grad():
                e.weight[pad_id].zero_()
        self.pos = SinusoidalPositionalEncoding(d_model, max_len)
        self.drop = nn.Dropout(dropout)
        enc_layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_ff, dropout, activation="relu", batch_first=True,
            norm_first=norm_first,
        )
        dec_layer = nn.TransformerDecoderLayer(
            d_model, nhead, dim_ff, dropout, activation="relu", batch_first=True,
            norm_first=norm_first,
        )
        self.encoder = nn.TransformerEncoder(
            enc_layer, layers, norm=nn.LayerNorm(d_model) if norm_first else None,
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            dec_layer, layers, norm=nn.LayerNorm(d_model) if norm_first else None
        )
        self.generator = nn.Linear(d_model, tgt_vocab)
        if tie_output:
            self.generator.weight = self.tgt_embed.weight

    def _src_padding_mask(self, src: Tensor) -> Tensor:
        mask = src == self.pad_id
        # A fully padded source would give NaN attention; let it attend to its first position.
        mask[:, 0] &= ~mask.all(dim=1)
        return mask

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> (memory (B, S, d_model), src padding mask (B, S), True = pad)."""
        src_mask = self._src_padding_mask(src)
        x = self.drop(self.pos(self.src_embed(src) * math.sqrt(self.d_model)))
        with _plain_attention():
            memory = self.encoder(x, src_key_padding_mask=src_mask)
        return memory, src_mask

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """tgt_in (B, T), memory from ``encode`` -> logits (B, T, tgt_vocab)."""
        t = tgt_in.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tgt_in.device), 1)
        tgt_pad = tgt_in == self.pad_id
        y = self.drop(self.pos(self.tgt_embed(tgt_in) * math.sqrt(self.d_model)))
        with _plain_attention():
            out = self.decoder(
                y, memory, tgt_mask=causal, tgt_key_padding_mask=tgt_pad,
                memory_key_padding_mask=src_mask,
            )
        return self.generator(out)

    def _decode_next(self, ys: Tensor, memory: Tensor, src_mask: Tensor, cache: dict) -> Tensor:
        """Logits (B, tgt_vocab) of the token after ``ys`` (B, T), computing only the last
        position with the layers of :meth:`decode`: ``cache`` keeps each layer's projected
        self-attention keys/values of the earlier positions and the cross-attention keys/values
        of ``memory``, so a token costs O(T), not O(T^2) plus a projection of the memory.
        Greedy decoding never feeds a pad before ``eos``, so unfinished rows need no target
        padding mask."""
        t = ys.shape[1]
        x = self.drop(self.pos(self.tgt_embed(ys[:, -1:]) * math.sqrt(self.d_model), offset=t - 1))
        if "attend" not in cache:  # the source positions each query may attend to, once
            cache["attend"] = ~src_mask[:, None, None, :]
        attend = cache["attend"]
        with _plain_attention():
            for i, layer in enumerate(self.decoder.layers):
                pre = layer.norm_first
                h = layer.norm1(x) if pre else x
                k, v = _project_kv(layer.self_attn, h)
                if i in cache:
                    k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
                cache[i] = (k, v)
                sa = layer.dropout1(_attend(layer.self_attn, h, k, v))
                x = x + sa if pre else layer.norm1(x + sa)
                h = layer.norm2(x) if pre else x
                if ("memory", i) not in cache:
                    cache["memory", i] = _project_kv(layer.multihead_attn, memory)
                ca = layer.dropout2(_attend(layer.multihead_attn, h, *cache["memory", i], attend))
                x = x + ca if pre else layer.norm2(x + ca)
                h = layer.norm3(x) if pre else x
                ff = layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(h)))))
                x = x + ff if pre else layer.norm3(x + ff)
            if self.decoder.norm is not None:
                x = self.decoder.norm(x)
        return self.generator(x[:, -1])

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) token ids (padded with pad_id) -> logits (B, T, tgt_vocab)."""
        if src.dim() != 2 or tgt_in.dim() != 2 or src.shape[0] != tgt_in.shape[0]:
            raise ValueError("src and tgt_in must be (B, S) and (B, T) with the same B")
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, max_len: int = 100) -> Tensor:
        """Greedy decoding of a batch of sources (B, S), padded with pad_id.

        Returns (B, L) generated target ids with L <= max_len, without the leading bos_id; each
        row ends at its first eos_id (included) and is padded with pad_id after it (pad_id and
        bos_id are never generated, so pad_id appears only after eos_id). Stops as soon
        as every row has produced eos_id. Runs in the model's current mode (call ``eval()``
        first) and without gradients.
        """
        max_len = min(int(max_len), self.max_len - 1)
        b = src.shape[0]
        memory, src_mask = self.encode(src)
        ys = torch.full((b, 1), self.bos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(b, dtype=torch.bool, device=src.device)
        cache: dict = {}
        for _ in range(max_len):
            logits = self._decode_next(ys, memory, src_mask, cache)
            logits[:, [self.pad_id, self.bos_id]] = float("-inf")  # never generated
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
            ys = torch.cat([ys, nxt.unsqueeze(1)], dim=1)
            finished |= nxt == self.eos_id
            if bool(finished.all()):
                break
        return ys[:, 1:]


# --------------------------------------------------------------------------------------------
# Text classifier
# --------------------------------------------------------------------------------------------


class TextClassifier(nn.Module):
    """Bag-of-embeddings (fastText-style) text classifier: nn.EmbeddingBag -> dropout -> Linear.

    Interface (one method, two input layouts):

    - ``forward(ids, offsets)``: ``ids`` 1-D (N,) concatenation of all documents' token ids,
      ``offsets`` 1-D (B,) start index of each document in ``ids`` (as for nn.EmbeddingBag).
    - ``forward(ids)``: ``ids`` 2-D (B, L), documents padded with ``pad_id``.

    Tokens equal to ``pad_id`` are ignored in both layouts (so ``pad_id`` must not be a real
    token; ``pad_id=None`` disables this and 2-D rows then count every position). ``mode`` is
    "mean", "sum" or "max"; empty documents give zero features. Returns logits (B, num_classes).

    ``F.embedding_bag`` has no double backward, so by default (``fused=False``) the bag is an
    equivalent embedding lookup + segment reduction that supports Hessian-vector products;
    ``fused=True`` uses the faster nn.EmbeddingBag kernel (first-order only). The parameters are
    the same either way (``embedding.weight`` of an nn.EmbeddingBag).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        emb: int = 64,
        mode: str = "mean",
        pad_id: Optional[int] = 0,
        dropout: float = 0.0,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("mean", "sum", "max"):
            raise ValueError(f"mode must be 'mean', 'sum' or 'max', got {mode!r}")
        self.vocab_size, self.num_classes = int(vocab_size), int(num_classes)
        self.mode, self.pad_id, self.fused = mode, pad_id, bool(fused)
        self.embedding = nn.EmbeddingBag(vocab_size, emb, mode=mode, padding_idx=pad_id)
        nn.init.uniform_(self.embedding.weight, -0.5 / emb**0.5, 0.5 / emb**0.5)
        if pad_id is not None:
            with torch.no_grad():
                self.embedding.weight[pad_id].zero_()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(emb, num_classes)

    def embed(self, ids: Tensor, offsets: Optional[Tensor] = None) -> Tensor:
        """Document features (B, emb) for the same inputs as ``forward``."""
        if offsets is None:
            if ids.dim() != 2:
                raise ValueError("without offsets, ids must be padded (B, L) token ids")
            if self.fused:
                return self.embedding(ids)
            b, length = ids.shape
            offsets = torch.arange(0, b * length, length, device=ids.device)
            ids = ids.reshape(-1)
        elif ids.dim() != 1 or offsets.dim() != 1:
            raise ValueError("with offsets, ids and offsets must both be 1-D")
        elif offsets.numel() > 0 and int(offsets[0]) != 0:
            raise ValueError("offsets[0] must be 0")
        elif self.fused:
            return self.embedding(ids, offsets)
        return self._bag(ids, offsets)

    def _bag(self, ids: Tensor, offsets: Tensor) -> Tensor:
        # Same result as F.embedding_bag, built from twice-differentiable ops.
        weight = self.embedding.weight
        n, b = ids.numel(), offsets.numel()
        lengths = torch.diff(offsets, append=offsets.new_tensor([n]))
        seg = torch.repeat_interleave(torch.arange(b, device=ids.device), lengths)
        pos = torch.arange(n, device=ids.device) - offsets[seg]  # position inside its document
        if self.pad_id is not None:
            keep = ids != self.pad_id
            ids, seg, pos = ids[keep], seg[keep], pos[keep]
        vecs = F.embedding(ids, weight)
        if self.mode == "max":
            longest = int(lengths.max()) if b > 0 and n > 0 else 0
            full = vecs.new_full((b, max(longest, 1), weight.shape[1]), float("-inf"))
            full = full.index_put((seg, pos), vecs)
            out = full.amax(dim=1)
            return torch.where(torch.isinf(out), torch.zeros_like(out), out)
        out = vecs.new_zeros(b, weight.shape[1]).index_add(0, seg, vecs)
        if self.mode == "mean":
            count = torch.bincount(seg, minlength=b).clamp(min=1).to(out.dtype)
            out = out / count.unsqueeze(1)
        return out

    def forward(self, ids: Tensor, offsets: Optional[Tensor] = None) -> Tensor:
        """(ids (N,), offsets (B,)) or padded ids (B, L) -> logits (B, num_classes)."""
        return self.fc(self.drop(self.embed(ids, offsets)))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "resnet": ResNet,
    "small_cnn": SmallCNN,
    "lstm_lm": LSTMLanguageModel,
    "transformer": TransformerTranslator,
    "text_classifier": TextClassifier,
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model by name ('mlp', 'resnet', 'lstm_lm', 'transformer', 'text_classifier';
    case-insensitive, '-' accepted for '_'), passing ``kwargs`` to its constructor."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; accepted names: {', '.join(sorted(MODELS))}"
        )
    return MODELS[key](**kwargs)  # type: ignore[arg-type]
