"""What `POST /jobs/{id}/generate` takes and answers, and what the API and a worker say to
each other on the inference queue (tuneq.inference.service, worker/inference.py).

The answer's shape follows the job's task, named by its `task` member: a chat reply
(`causal_lm`), a label with a probability per label (`seq_classification`), or a tag per
word (`token_classification`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# Which request members each task takes (the first: what it needs, unless noted in service).
TASK_INPUTS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("messages", "prompt", "max_new_tokens"),
    "seq_classification": ("text", "text_pair"),
    "token_classification": ("tokens", "text"),
}
INPUT_MEMBERS = ("messages", "prompt", "text", "text_pair", "tokens", "max_new_tokens")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class GenerateRequest(BaseModel):
    """The input for the job's task, and which of its trained weights answer."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(
        None,
        description="causal_lm: the conversation so far, rendered by the model's chat "
        "template; the answer is the assistant's next message",
    )
    prompt: str | None = Field(
        None,
        description="causal_lm, instead of `messages`: a text to continue as it stands, with "
        "no chat template (for a job trained on prompt/completion or plain text data); the "
        "answer's message holds the continuation",
    )
    text: str | None = Field(
        None,
        description="seq_classification: the text to label; token_classification: the "
        "sentence to tag, split into words on whitespace",
    )
    text_pair: str | None = Field(
        None, description="seq_classification of pairs: the second text (text_b)"
    )
    tokens: list[str] | None = Field(
        None, description="token_classification: the words to tag, one tag each"
    )
    checkpoint: int | None = Field(
        None,
        ge=0,
        description="the step of one of the job's checkpoints (GET /jobs/{id}/checkpoints) "
        "to answer with; unset: the job's adapter",
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="causal_lm: the most tokens the answer may have (default and most: "
        "TUNEQ_GENERATE_MAX_NEW_TOKENS)",
    )


class Usage(BaseModel):
    input_tokens: int = Field(description="tokens the input made, as the model read it")
    output_tokens: int = Field(0, description="tokens generated (causal_lm)")


class _Generation(BaseModel):
    object: Literal["job.generation"] = "job.generation"
    job_id: str
    task: str  # each answer's own, which tells them apart
    checkpoint: int | None = Field(
        description="the checkpoint's step that answered; null: the job's adapter"
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatGeneration(_Generation):
    """A causal LM's reply, decoded greedily."""

    task: Literal["causal_lm"] = "causal_lm"
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended its turn; length: max_new_tokens was reached"
    )
    usage: Usage


class LabelGeneration(_Generation):
    """A sequence classifier's label, and the probability of each label."""

    task: Literal["seq_classification"] = "seq_classification"
    label: str
    scores: dict[str, float] = Field(description="each label's probability")
    usage: Usage


class TaggedToken(BaseModel):
    token: str
    tag: str
    score: float | None = Field(
        description="the tag's probability; null for a word that made no token of its own"
    )


class TagGeneration(_Generation):
    """A token classifier's tag for each word (IOB2), read at the word's first sub-token."""

    task: Literal["token_classification"] = "token_classification"
    tokens: list[TaggedToken]
    usage: Usage


Generation = Annotated[
    ChatGeneration | LabelGeneration | TagGeneration, Field(discriminator="task")
]
GENERATION: TypeAdapter[Any] = TypeAdapter(Generation)


class InferenceRequest(BaseModel):
    """What the API asks a worker: the generate task's one argument, as JSON. The input was
    checked by the API; the worker re-reads the job and the artifact named here."""

    job_id: str
    artifact: str  # adapter.tar.gz or checkpoint-{step}.tar.gz
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    text: str | None = None
    text_pair: str | None = None
    tokens: list[str] | None = None
    max_new_tokens: int
    max_input_tokens: int


class InferenceError(BaseModel):
    """A fault of the request the worker found (the input too long for the model, ...)."""

    message: str
    param: str | None = None


class InferenceReply(BaseModel):
    """A worker's reply: the task's answer (a Generation's members but the envelope), or
    the request's fault."""

    answer: dict[str, Any] | None = None
    error: InferenceError | None = None
