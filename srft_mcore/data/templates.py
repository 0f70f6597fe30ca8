"""Prompt rendering: ``tokenizer`` (the model's chat template), ``think`` (the paper's
system prompt) and ``plain``.

The ``think`` template follows arXiv 2506.19767 (section 4): the system prompt asks for the
reasoning inside ``<think> </think>`` and the final answer in ``\\boxed{}``. It is rendered
through the tokenizer's chat template when there is one, else in a plain fallback format.
"""
from __future__ import annotations

TEMPLATES = ("tokenizer", "think", "plain")

THINK_SYSTEM_PROMPT = (
    "Please reason step by step. Put your reasoning inside <think> </think>, "
    "then give the final answer within \\boxed{}."
)


class TemplateError(ValueError):
    """The requested template cannot be rendered with this tokenizer."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat(tokenizer, messages: list) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


def render_prompt(tokenizer, prompt: str, template: str = "tokenizer") -> str:
    """The text the policy continues from, ending where the response starts.

    tokenizer: ``[user]`` through the tokenizer's chat template (generation prompt added).
    think:     ``[system: THINK_SYSTEM_PROMPT, user]`` through the chat template, or
               ``System: ...\\nUser: ...\\nAssistant:`` when the tokenizer has none.
    plain:     ``Question: ...\\nAnswer:`` (no chat markup at all).
    """
    if template == "tokenizer":
        if not has_chat_template(tokenizer):
            raise TemplateError("data.template=tokenizer but the tokenizer has no chat template "
                                "(a base model?). Fix: set data.template=think (the paper's "
                                "<think> prompt in a plain format) or data.template=plain")
        return _chat(tokenizer, [{"role": "user", "content": prompt}])
    if template == "think":
        if has_chat_template(tokenizer):
            return _chat(tokenizer, [{"role": "system", "content": THINK_SYSTEM_PROMPT},
                                     {"role": "user", "content": prompt}])
        return f"System: {THINK_SYSTEM_PROMPT}\nUser: {prompt}\nAssistant:"
    if template == "plain":
        return f"Question: {prompt}\nAnswer:"
    raise TemplateError(f"data.template={template!r} is not a template; use one of "
                        f"{', '.join(TEMPLATES)}")
