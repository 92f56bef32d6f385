"""Per-target prompts: each target's template rendered with the request's variables.

Prompts are maintained per model (a fallback model gets its own wording), so every target compiles its
own template, once per policy load. Jinja runs sandboxed (templates come from a policy, variables from
the request) and strict: a missing variable, or one of a type the template cannot use, is the app's
error (400), reported before any upstream call.
"""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import RequestError

DEFAULT_TEMPLATE = "{{ input }}"
"""Targets without a template send the request's `input` variable as the user message."""

_ENVIRONMENT = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class PromptTemplate:
    """A compiled template; `render` raises RequestError(400) naming what is missing."""

    __slots__ = ("_template", "source")

    def __init__(self, source: str | None) -> None:
        self.source = source if source is not None else DEFAULT_TEMPLATE
        self._template = _ENVIRONMENT.from_string(self.source)

    def render(self, variables: dict[str, Any]) -> str:
        try:
            return self._template.render(variables)
        except UndefinedError as exc:
            raise RequestError(400, f"template variable missing: {exc.message}") from None
        except TemplateError as exc:
            raise RequestError(400, f"template failed to render: {exc}") from None
        except RecursionError:
            raise RequestError(400, "template failed to render: too deep") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            # A variable of the wrong type for the template (`join` on a number, `+` on a string...):
            # the request's fault, a 400, never a 500.
            raise RequestError(400, f"template failed to render: {type(exc).__name__}: {exc}") from None


def compile_template(source: str | None) -> PromptTemplate:
    """Compile at policy load; a syntax error is a policy error (ValueError)."""
    try:
        return PromptTemplate(source)
    except TemplateError as exc:
        raise ValueError(f"invalid template: {exc}") from None
