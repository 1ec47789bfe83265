"""Answers from a base model, with or without a trained adapter: for demos and spot checks.

Greedy decoding through the model's own chat template, so the tuned and the base model are
compared on exactly the same prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peft_engine.models import ModelRegistry, load_causal_lm, load_tokenizer, model_dir


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
        messages = [{"role": "user", "content": prompt}]
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        generate_kwargs = {
            **inputs,
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if tuned:
            output = self.model.generate(**generate_kwargs)
        else:
            with self.model.disable_adapter():
                output = self.model.generate(**generate_kwargs)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
