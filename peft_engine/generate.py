"""Answers from a trained model: a job's output or checkpoint on its base model.

`TrainedModel` loads one with `load_trained` (inside a worker's `ResidentModels.active()`
the base weights come from memory) and answers as its task does:

    causal_lm              chat messages → the assistant's next message, greedy, through
                           the model's chat template (as the training data was rendered)
    seq_classification     a text (or a pair) → its label and a probability per label
    token_classification   words → a tag per word, read at each word's first sub-token
                           as the evaluation reads it, with its probability

An input longer than the limit is refused (a UserError naming the field), never cut: an
answer to half a question would mislead. `Answerer` (the demo's before/after table) answers
with the adapter on or off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peft_engine.errors import UserError
from peft_engine.models import ModelRegistry, load_causal_lm, load_tokenizer, model_dir
from peft_engine.precision import autocast_to, resumed_precision


@dataclass(frozen=True)
class ChatReply:
    content: str
    finish_reason: str  # "stop": the model ended its turn; "length": max_new_tokens reached
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LabelScores:
    label: str
    scores: dict[str, float]  # every label's probability, in the labels' order
    input_tokens: int


@dataclass(frozen=True)
class WordTag:
    word: str
    tag: str
    score: float | None  # the tag's probability; None for a word that made no token


@dataclass(frozen=True)
class WordTags:
    words: list[WordTag]
    input_tokens: int


def trained_dtype(output_dir: Path, device: torch.device) -> torch.dtype:
    """The compute dtype to answer with: the mode the job trained and evaluated in (its
    `tuneq_model.json`), where `device` runs it, else the device's "auto" mode, as a
    resumed job's precision is chosen. An output from before the mode was recorded: auto."""
    from peft_engine.methods.weights import trained_model_info

    recorded = trained_model_info(output_dir).get("precision")
    precision, _ = resumed_precision("auto", device, recorded)
    return precision.compute_dtype


class TrainedModel:
    """A job's output (or one of its checkpoints) loaded on its base model, for answers."""

    def __init__(
        self,
        output_dir: Path,
        base_dir: Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        from peft_engine.methods.weights import load_trained, trained_model_info
        from peft_engine.models import read_model_info

        info = trained_model_info(output_dir)
        self.task: str = info["task"]
        self.labels: tuple[str, ...] = tuple(info.get("labels") or ())
        self.device = torch.device(device)
        self.dtype = dtype  # weights in bf16/fp16 compute under autocast to it, as in training
        self.tokenizer = load_tokenizer(base_dir)
        # Prompts longer than the model has positions for would fail or run off its training.
        self.context = read_model_info(base_dir).max_position_embeddings
        model = load_trained(output_dir, base_dir, dtype=dtype, device=self.device)
        self.model: Any = model.to(self.device).eval()

    @torch.no_grad()
    def reply(
        self, messages: list[dict[str, str]], *, max_new_tokens: int, max_input_tokens: int
    ) -> ChatReply:
        """The assistant's next message after `messages`, decoded greedily."""
        ids = chat_prompt_ids(self.tokenizer, messages)
        return self._continue(ids, "messages", max_new_tokens, max_input_tokens)

    @torch.no_grad()
    def complete(self, prompt: str, *, max_new_tokens: int, max_input_tokens: int) -> ChatReply:
        """What follows `prompt`, decoded greedily: for a model trained on prompt/completion
        or plain text, tokenized as training tokenized its prompts (no chat template)."""
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return self._continue(ids, "prompt", max_new_tokens, max_input_tokens)

    def _continue(
        self, ids: list[int], param: str, max_new_tokens: int, max_input_tokens: int
    ) -> ChatReply:
        room = None if self.context is None else self.context - max_new_tokens
        _check_length(len(ids), _tightest(max_input_tokens, room), param)
        if not ids:
            raise UserError("the input made no tokens", param=param)
        with autocast_to(self.device, self.dtype):
            new = greedy(self.model, self.tokenizer, ids, max_new_tokens, self.device)
        stops = _stop_ids(self.model, self.tokenizer)
        finish = "stop" if new and new[-1] in stops else "length"
        content = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return ChatReply(content, finish, len(ids), len(new))

    @torch.no_grad()
    def classify(self, text: str, text_pair: str | None, *, max_input_tokens: int) -> LabelScores:
        """The text's label (a pair: `text` and `text_pair`), with every label's probability."""
        encoded = self.tokenizer(text, text_pair, add_special_tokens=True)
        n = len(encoded["input_ids"])
        _check_length(n, _tightest(max_input_tokens, self.context), "text")
        probabilities = self._probabilities(encoded)
        scores = {
            label: round(float(p), 6) for label, p in zip(self.labels, probabilities, strict=True)
        }
        return LabelScores(self.labels[int(probabilities.argmax())], scores, n)

    @torch.no_grad()
    def tag(self, words: list[str], *, max_input_tokens: int) -> WordTags:
        """A tag for each word, read at the word's first sub-token."""
        from peft_engine.tasks.token_classification import first_subtokens, joined_words

        if not getattr(self.tokenizer, "is_fast", False):
            raise UserError("this model's tokenizer cannot locate words", param="tokens")
        text, spans = joined_words(words)
        encoded = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        offsets = encoded.pop("offset_mapping")
        n = len(encoded["input_ids"])
        _check_length(n, _tightest(max_input_tokens, self.context), "tokens")
        probabilities = self._probabilities(encoded)
        probabilities = probabilities[probabilities.shape[0] - n :]  # past virtual tokens
        tagged = []
        for word, position in zip(words, first_subtokens(text, spans, offsets), strict=True):
            if position < 0:  # a word that made no token (the tokenizer dropped it): "O"
                tagged.append(WordTag(word, "O", None))
                continue
            best = int(probabilities[position].argmax())
            score = round(float(probabilities[position, best]), 6)
            tagged.append(WordTag(word, self.labels[best], score))
        return WordTags(tagged, n)

    def _probabilities(self, encoded: Any) -> torch.Tensor:
        """Softmax over the labels of one encoded input: (labels,) or (positions, labels)."""
        inputs = {
            name: torch.tensor([encoded[name]], device=self.device)
            for name in ("input_ids", "attention_mask", "token_type_ids")
            if name in encoded
        }
        with autocast_to(self.device, self.dtype):
            logits = self.model(**inputs).logits.float()[0]
        return logits.softmax(dim=-1).cpu()


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation rendered by the chat template with the assistant's header after it,
    tokenized the way training tokenizes rendered chats (no special tokens added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this model's tokenizer has no chat template", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises its own errors, e.g. for a role it rejects
        raise UserError(f"the model's chat template refused them: {exc}", param="messages") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def greedy(
    model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int, device: torch.device
) -> list[int]:
    """The tokens greedy decoding adds after `ids`, up to the end of the turn."""
    input_ids = torch.tensor([ids], device=device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return output[0, len(ids) :].tolist()


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end generation: the generation config's and the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = set(configured if isinstance(configured, list) else [configured])
    stops.add(tokenizer.eos_token_id)
    return {token for token in stops if token is not None}


def _tightest(limit: int, context: int | None) -> int:
    return limit if context is None else min(limit, context)


def _check_length(n_tokens: int, limit: int, param: str) -> None:
    if n_tokens > limit:
        raise UserError(
            f"the input is {n_tokens} tokens; at most {limit} are answered (the "
            "deployment's limit, within the model's context)",
            param=param,
        )


class Answerer:
    """One base model in memory; `answer` with the adapter on or off."""

    def __init__(
        self, model: str, adapter_dir: Path, *, registry: ModelRegistry, cache_dir: Path
    ) -> None:
        from peft import PeftModel

        path = model_dir(registry.get(model), cache_dir)
        assert path is not None
        self.tokenizer = load_tokenizer(path)
        base = load_causal_lm(path)
        self.model: Any = PeftModel.from_pretrained(base, adapter_dir)
        self.model.eval()

    @torch.no_grad()
    def answer(self, prompt: str, *, tuned: bool, max_new_tokens: int = 48) -> str:
        ids = chat_prompt_ids(self.tokenizer, [{"role": "user", "content": prompt}])
        if tuned:
            new = greedy(self.model, self.tokenizer, ids, max_new_tokens, self.model.device)
        else:
            with self.model.disable_adapter():
                new = greedy(self.model, self.tokenizer, ids, max_new_tokens, self.model.device)
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()
