"""One tokenization of (prompt, response) for every stage that reads or writes per-token values.

The teacher's top-k store, the advantage store and the student's trainer all call
`tokenize_exchange`, so position t of a stored row is the t-th response token the student is
trained on: same chat template, same tokens, response tokens only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adpa.core.errors import InputError

Message = dict[str, str]


class SequenceError(InputError):
    """A row whose tokenization cannot be aligned; the message names the row."""


@dataclass(frozen=True)
class Exchange:
    """input_ids of prompt + response; response tokens are input_ids[response_start:]."""

    input_ids: list[int]
    response_start: int

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.response_start


def template_fingerprint(tokenizer) -> str:
    """Stores record the template and vocabulary they were tokenized with; trainers check it."""
    text = f"{tokenizer.chat_template}|{len(tokenizer)}|{tokenizer.eos_token}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


def tokenize_exchange(
    tokenizer,
    prompt: Sequence[Message],
    response: Sequence[Message],
    max_length: int,
    where: str = "row",
    key: str = "max_length",
) -> Exchange:
    """Template-tokenize a conversation; keep its first `max_length` tokens (at least one response token)."""
    prompt_ids = _ids(
        tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)
    )
    full_ids = _ids(tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=True, return_dict=True))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # The reference code silently dropped such rows; a template that does this is a config error.
        raise SequenceError(f"{where}: the chat template's prompt is not a prefix of the full conversation")
    if len(prompt_ids) >= max_length:
        raise SequenceError(
            f"{where}: prompt has {len(prompt_ids)} tokens, {key} is {max_length}; no response token would be left"
        )
    return Exchange(full_ids[:max_length], len(prompt_ids))


def tokenize_rows(
    tokenizer, prompts, responses, max_length: int, where: str, key: str = "max_length"
) -> list[Exchange]:
    """tokenize_exchange for every (prompt, response) row; errors name `where`, the row index and `key`."""
    return [
        tokenize_exchange(tokenizer, prompt, response, max_length, f"{where} row {index}", key)
        for index, (prompt, response) in enumerate(zip(prompts, responses))
    ]


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_left(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask [B, L]: every row ends at the last position (for generation)."""
    width = max(len(row) for row in sequences)
    ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in sequences])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in sequences])
    return ids, mask


def pad_right(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask [B, L]."""
    width = max(len(row) for row in sequences)
    ids = torch.tensor([list(row) + [pad_id] * (width - len(row)) for row in sequences])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in sequences])
    return ids, mask


def pad_exchanges(exchanges: Sequence[Exchange], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. `response_mask[b, t]` marks label positions: token t+1 is a response token.

    Returns input_ids [B, L], attention_mask [B, L], response_mask [B, L-1] (aligned with
    logits[:, :-1] and labels input_ids[:, 1:]), and response_start [B].
    """
    length = max(len(exchange.input_ids) for exchange in exchanges)
    input_ids = torch.full((len(exchanges), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(exchanges), length), dtype=torch.long)
    for row, exchange in enumerate(exchanges):
        input_ids[row, : len(exchange.input_ids)] = torch.tensor(exchange.input_ids)
        attention_mask[row, : len(exchange.input_ids)] = 1
    starts = torch.tensor([exchange.response_start for exchange in exchanges])
    ends = attention_mask.sum(-1)
    positions = torch.arange(1, length)[None, :]
    response_mask = (positions >= starts[:, None]) & (positions < ends[:, None])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "response_start": starts,
    }


def response_positions(exchanges: Sequence[Exchange], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For right-padded rows `width` tokens wide (pad_exchanges): the positions [B, R] of the logits
    that predict each response token, in response order (R: the longest response), and its mask.

    Response token j of a row is input position start + j, predicted by the logits at start + j - 1;
    positions past a row's response are clamped into the row (masked).
    """
    lengths = torch.tensor([exchange.response_length for exchange in exchanges])
    starts = torch.tensor([exchange.response_start for exchange in exchanges])
    steps = torch.arange(int(lengths.max()))[None, :]
    return (starts[:, None] - 1 + steps).clamp(max=width - 2), steps < lengths[:, None]


def pack_exchanges(exchanges: Sequence[Exchange]) -> dict[str, torch.Tensor]:
    """All rows concatenated into one padding-free row: input_ids [1, N] (N: the total token count) and
    position_ids [1, N] restarting at 0 with each row. No attention mask: from position_ids without a mask
    transformers builds a block-causal mask (eager, sdpa, flex) or runs flash-attention varlen, so each
    row attends to itself only, and no compute goes to padding.
    """
    input_ids = torch.tensor([token for exchange in exchanges for token in exchange.input_ids])
    position_ids = torch.cat([torch.arange(len(exchange.input_ids)) for exchange in exchanges])
    return {"input_ids": input_ids[None, :], "position_ids": position_ids[None, :]}


def packed_response_positions(exchanges: Sequence[Exchange]) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_positions` for rows packed by `pack_exchanges`: positions [B, R] into the flat axis N
    (row b's positions shifted by the tokens of the rows before it), so what is laid out in response
    order [B, R] reads the same as for padded rows. Masked positions point at index 0.
    """
    lengths = torch.tensor([len(exchange.input_ids) for exchange in exchanges])
    offsets = lengths.cumsum(0) - lengths
    positions, mask = response_positions(exchanges, int(lengths.max()))
    return torch.where(mask, positions + offsets[:, None], 0), mask
