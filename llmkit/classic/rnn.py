"""Recurrent language models: a vanilla (Elman) RNN, a GRU and an LSTM, with the cells written out.

One `Recurrent` layer serves all three; a kind is one `Cell` record (how many gate blocks its weights
hold and its step function), laid out exactly as torch.nn.RNN / GRU / LSTM lay theirs out, so the
same weights give the same outputs (tests/test_classic.py):

  rnn   h' = tanh(W_ih x + b_ih + W_hh h + b_hh)                                  (Elman 1990)
  gru   r = σ(.), z = σ(.), n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))        (Cho et al. 2014)
        h' = (1 - z) ⊙ n + z ⊙ h
  lstm  i, f, g, o = σ(.), σ(.), tanh(.), σ(.);  c' = f ⊙ c + i ⊙ g;  h' = o ⊙ tanh(c')
                                                                    (Hochreiter & Schmidhuber 1997)

The input projections of all T steps are one matmul (B, T, I) @ (I, G·H); only h @ W_hh runs in the
time loop. That loop is Python, so autograd records ~10 ops per step: on one CPU thread a step of
the 512-wide LSTM takes ~3x as long as torch.nn.LSTM's fused C++ loop. `RNNConfig.fused` (the
default for training) therefore runs the same weights through torch.nn.{RNN,GRU,LSTM} (`FusedRecurrent`,
the same parameter layout and outputs as `Recurrent`, tests/test_classic.py); `fused=False` runs the
written-out cells. Training is truncated backpropagation through time: the state is carried from one window
of the token stream to the next but detached, so gradients flow back at most one window.

Shapes: B batch, T time steps, V vocabulary, E embedding width, H hidden width, G gate blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError, closest


@dataclass(frozen=True)
class Cell:
    gates: int  # G: blocks of H rows in W_ih / W_hh
    has_cell_state: bool  # LSTM carries (h, c); the others h only
    # (xw_t (B, G·H) = W_ih x_t + b_ih, h (B, H), c (B, H) or None, W_hh (G·H, H), b_hh (G·H,)) -> (h', c')
    step: Callable
    torch_cls: type  # the torch.nn module with the same layout (the fused kernel)


def _rnn_step(xw, h, c, w_hh, b_hh):
    return torch.tanh(xw + F.linear(h, w_hh, b_hh)), None


def _gru_step(xw, h, c, w_hh, b_hh):
    x_r, x_z, x_n = xw.chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)  # the reset gate scales the recurrent part only (as torch and cuDNN do)
    return (1 - z) * n + z * h, None


def _lstm_step(xw, h, c, w_hh, b_hh):
    i, f, g, o = (xw + F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


CELLS: dict[str, Cell] = {
    "rnn": Cell(gates=1, has_cell_state=False, step=_rnn_step, torch_cls=nn.RNN),
    "gru": Cell(gates=3, has_cell_state=False, step=_gru_step, torch_cls=nn.GRU),
    "lstm": Cell(gates=4, has_cell_state=True, step=_lstm_step, torch_cls=nn.LSTM),
}


def get_cell(kind: str) -> Cell:
    if kind not in CELLS:
        hint = closest(kind, list(CELLS))
        raise LLMKitError(f"unknown recurrent cell {kind!r}" + (f" (did you mean {hint!r}?)" if hint else "")
                          + f"; choose from {', '.join(CELLS)}")
    return CELLS[kind]


class Recurrent(nn.Module):
    """One recurrent layer; parameter names and layouts as torch.nn.{RNN,GRU,LSTM}'s layer 0."""

    def __init__(self, kind: str, input_size: int, hidden_size: int):
        super().__init__()
        self.kind, self.cell, self.hidden_size = kind, get_cell(kind), hidden_size
        G = self.cell.gates
        self.weight_ih = nn.Parameter(torch.empty(G * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(G * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(G * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(G * hidden_size))
        bound = hidden_size ** -0.5  # torch's init: U(-1/√H, 1/√H)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def zero_state(self, B: int, device=None) -> tuple:
        h = torch.zeros(B, self.hidden_size, device=device)
        return (h, torch.zeros_like(h)) if self.cell.has_cell_state else (h, None)

    def forward(self, x: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """x (B, T, I) -> outputs (B, T, H), final state (h, c)."""
        B, T, _ = x.shape
        h, c = state if state is not None else self.zero_state(B, x.device)
        xw = F.linear(x, self.weight_ih, self.bias_ih)  # (B, T, G·H): every step's input part at once
        outs = []
        for t in range(T):
            h, c = self.cell.step(xw[:, t], h, c, self.weight_hh, self.bias_hh)
            outs.append(h)
        return torch.stack(outs, dim=1), (h, c)


class FusedRecurrent(nn.Module):
    """The same layer run by torch.nn.{RNN,GRU,LSTM}'s fused loop: same parameters (`rnn.weight_ih_l0`
    ... in `Recurrent`'s layout), same state convention ((h, c), each (B, H); c None but for LSTM)."""

    def __init__(self, kind: str, input_size: int, hidden_size: int):
        super().__init__()
        self.kind, self.cell, self.hidden_size = kind, get_cell(kind), hidden_size
        self.rnn = self.cell.torch_cls(input_size, hidden_size, batch_first=True)
        bound = hidden_size ** -0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    zero_state = Recurrent.zero_state

    def forward(self, x: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        h, c = state if state is not None else self.zero_state(x.shape[0], x.device)
        if self.cell.has_cell_state:
            y, (h, c) = self.rnn(x, (h[None], c[None]))
            return y, (h[0], c[0])
        y, h = self.rnn(x, h[None])
        return y, (h[0], None)


@dataclass
class RNNConfig:
    kind: str = "lstm"  # rnn | gru | lstm
    vocab_size: int = 512
    d_embed: int = 256
    d_hidden: int = 512
    n_layer: int = 1
    dropout: float = 0.2  # on embeddings, between layers and before the head (Zaremba et al. 2014)
    fused: bool = True  # torch.nn's fused loop over the same weights (FusedRecurrent); False: the cells above


class RNNLM(nn.Module):
    """Embedding -> n_layer recurrent layers -> linear head. ids (B, T) -> logits (B, T, V), state."""

    def __init__(self, cfg: RNNConfig):
        super().__init__()
        get_cell(cfg.kind)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        layer = FusedRecurrent if cfg.fused else Recurrent
        self.layers = nn.ModuleList(layer(cfg.kind, cfg.d_embed if i == 0 else cfg.d_hidden, cfg.d_hidden)
                                    for i in range(cfg.n_layer))
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.d_hidden, cfg.vocab_size)
        nn.init.normal_(self.embed.weight, std=0.1)

    def zero_state(self, B: int, device=None) -> list:
        return [layer.zero_state(B, device) for layer in self.layers]

    def forward(self, ids: torch.Tensor, state: list | None = None) -> tuple[torch.Tensor, list]:
        x = self.drop(self.embed(ids))
        state = state or self.zero_state(ids.shape[0], ids.device)
        new_state = []
        for layer, s in zip(self.layers, state):
            x, s = layer(x, s)
            x = self.drop(x)
            new_state.append(s)
        return self.head(x), new_state


def detach_state(state: list) -> list:
    """Truncated BPTT: keep the values, cut the graph."""
    return [tuple(t.detach() if t is not None else None for t in s) for s in state]


@torch.no_grad()
def stream_logprobs(model: RNNLM, ids: list[int], chunk: int = 512) -> torch.Tensor:
    """ln p of every token after the first, reading the whole stream in order with the state carried
    across chunks (an RNN's context is everything before): (len(ids) - 1,)."""
    if len(ids) < 2:
        raise LLMKitError("need at least 2 tokens to score")
    model.eval()
    x = torch.tensor(ids)[None]
    state, out = None, []
    for s in range(0, len(ids) - 1, chunk):
        inp, tgt = x[:, s:s + chunk], x[:, s + 1:s + chunk + 1]
        logits, state = model(inp[:, :tgt.shape[1]], state)
        out.append(torch.log_softmax(logits.float(), -1).gather(-1, tgt[..., None])[0, :, 0])
    return torch.cat(out)
