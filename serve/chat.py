"""Chat templates rendered as transformers renders them, in Jinja's sandbox (a template is checkpoint data, never
code we run: the sandbox refuses attribute access to internals, as transformers' own environment does)."""

from __future__ import annotations

import json
from neodeploy.core.errors import UsageError


class TemplateError(UsageError):
    """The artifact's chat template cannot render these messages."""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None, eos_token: str | None):
        from jinja2 import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
            x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except JinjaError as exc:
            raise UsageError(f"the artifact's chat template does not parse ({exc}); fix tokenizer_config.json") from exc
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        # Templates that show tools read a `tools` variable (transformers' convention); others get a system note.
        self.takes_tools = "tools" in source

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        try:
            return self.template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 - the template is data: its sandbox's OverflowError, a TypeError on a
            # message it does not expect, Jinja's own errors: each is this request's 400, never a 500
            raise TemplateError(f"the chat template failed on these messages: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
