"""Chat templates, rendered in a locked-down Jinja sandbox with limits on time and size.

A chat template is code: the model's own (its tokenizer config) and, with --trust-request-chat-template,
a request's. jinja2's ImmutableSandboxedEnvironment stops attribute escapes and mutation of the inputs, but
not a template that loops for minutes or builds a string of gigabytes (`{{ "x" * 10**10 }}`, nested
`range` loops, doubling a namespace string). So this environment also
  - checks a deadline at every loop iteration (an AST pass wraps each `for` iterable), call, attribute or
    item lookup, intercepted operator and filter;
  - refuses values bigger than `max_chars` (strings) or `_MAX_ITEMS` (lists, dicts) where they are made,
    and checks sizes *before* `*`, `+`, `**`, `%`, `str.format` and size-taking filter arguments allocate;
  - stops the output at `max_chars`.
The environment, globals and filters mirror transformers' `apply_chat_template`, so prompts are the ones the
model was trained with. Rendering is blocking: callers run it off the event loop.
"""
from __future__ import annotations

import functools
import json
import re
import threading
import time
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

DEFAULT_TIMEOUT_S = 2.0
_MAX_ITEMS = 100_000  # list / dict / tuple length (jinja's own range() cap)
_MAX_POWER_BITS = 1 << 16  # `a ** b` on ints: result size
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
_LOOP_GUARD = "_elastic_loop_guard"
_PERCENT_WIDTHS = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?[a-zA-Z]")  # printf-style: %10.3f
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")  # str.format: {0:>10}
_NUMBER = re.compile(r"\d+")


class ChatTemplateError(ValueError):
    """The template failed (syntax, raise_exception, a limit): the request's fault, a 400."""


class _Limits(threading.local):
    deadline: float | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_chars: int = 1 << 20


_limits = _Limits()  # per thread: renders run in a thread pool


def _tick() -> None:
    if _limits.deadline is not None and time.monotonic() > _limits.deadline:
        raise ChatTemplateError(f"the chat template ran longer than {_limits.timeout_s:g} s")


def _sized(value: Any) -> Any:
    """Refuse an oversized value where it was made, before the template can grow it further."""
    if isinstance(value, (str, bytes)) and len(value) > _limits.max_chars:
        raise ChatTemplateError(f"the chat template made a string of more than {_limits.max_chars} characters")
    if isinstance(value, (list, tuple, dict, set)) and len(value) > _MAX_ITEMS:
        raise ChatTemplateError(f"the chat template made a collection of more than {_MAX_ITEMS} items")
    return value


def _check_size_args(values: Iterable[Any]) -> None:
    """Integer arguments of str methods and filters are sizes (widths, counts): bound them before they allocate."""
    if any(isinstance(v, int) and abs(v) > _limits.max_chars for v in values):
        raise ChatTemplateError(f"the chat template asked for a size above {_limits.max_chars}")


def _check_format_string(text: str, percent_style: bool) -> None:
    """Widths and precisions in a format string are sizes too ('%1000000000s', '{:>1000000000}')."""
    if percent_style:
        numbers = [n for pair in _PERCENT_WIDTHS.findall(text) for n in pair if n]
    else:
        numbers = [n for spec in _BRACE_SPEC.findall(text) for n in _NUMBER.findall(spec)]
    if any(len(n) > 9 or int(n) > _limits.max_chars for n in numbers):
        raise ChatTemplateError(f"the chat template asked for a format width above {_limits.max_chars}")


def _precheck_binop(op: str, left: Any, right: Any) -> None:
    seq = (str, bytes, list, tuple)
    if op == "*":
        for a, b in ((left, right), (right, left)):
            if isinstance(a, seq) and isinstance(b, int) and len(a) * max(b, 0) > _limits.max_chars:
                raise ChatTemplateError(f"the chat template made a value of more than {_limits.max_chars} items")
    elif op == "+" and isinstance(left, seq) and isinstance(right, seq):
        if len(left) + len(right) > _limits.max_chars:
            raise ChatTemplateError(f"the chat template made a value of more than {_limits.max_chars} items")
    elif op == "**" and isinstance(left, int) and isinstance(right, int):
        if abs(left) > 1 and right > 0 and left.bit_length() * right > _MAX_POWER_BITS:
            raise ChatTemplateError("the chat template computed a power that is too large")
    elif op == "%" and isinstance(left, str):
        _check_format_string(left, percent_style=True)
        _check_size_args(right if isinstance(right, tuple) else (right,))


def loop_guard(iterable: Any) -> Iterator[Any]:
    for item in iterable:
        _tick()
        yield item


def _limited_filter(fn: Callable[..., Any]) -> Callable[..., Any]:
    # The filtered value comes first (after the context, for pass_context filters); later ints are sizes.
    skip = 2 if getattr(fn, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(fn)  # keeps jinja_pass_arg (pass_context / pass_environment)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_size_args(list(args[skip:]) + list(kwargs.values()))
        if fn.__name__ == "do_format" and len(args) > skip - 1 and isinstance(args[skip - 1], str):
            _check_format_string(args[skip - 1], percent_style=True)
        return _sized(fn(*args, **kwargs))

    return wrapper


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateNamespace(Namespace):
    """jinja's namespace() without underscore attributes (no way towards CPython internals), as transformers."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attributes cannot start with '_': {name!r}")


class LimitedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "+", "**", "%", "//"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: _limited_filter(fn) for name, fn in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                            namespace=_TemplateNamespace, **{_LOOP_GUARD: loop_guard})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):  # every loop iteration checks the deadline
            guard = nodes.Call(nodes.Name(_LOOP_GUARD, "load"), [loop.iter], [], None, None)
            loop.iter = guard.set_lineno(loop.lineno).set_environment(self)
        return tree

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        if isinstance(getattr(__obj, "__self__", None), str):  # "x".ljust(10**10) and friends
            _check_size_args(list(args) + list(kwargs.values()))
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return _sized(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return _sized(super().getitem(obj, argument))

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        _tick()
        _precheck_binop(op, left, right)
        return _sized(super().call_binop(context, op, left, right))

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_string(value.__self__, percent_style=False)

            def checked(*args: Any, **kwargs: Any) -> str:
                _check_size_args(list(args) + list(kwargs.values()))
                return wrapped(*args, **kwargs)

            return checked
        return None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping, with indent / separators options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (as transformers)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


_ENV_LOCK = threading.Lock()
_ENV: LimitedSandbox | None = None


def _environment() -> LimitedSandbox:
    global _ENV
    with _ENV_LOCK:
        if _ENV is None:
            _ENV = LimitedSandbox()
        return _ENV


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


class ChatTemplateRenderer:
    """Renders conversations with the model's template (or a trusted request's) within the limits.

    `special_tokens`: the tokenizer's special-token strings (bos_token, eos_token, ...), template variables
    as in transformers; `max_chars`: the largest value or output a render may produce."""

    def __init__(self, template: str | None, special_tokens: dict[str, str], max_chars: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.template = template
        self.special_tokens = dict(special_tokens)
        self.max_chars = max_chars
        self.timeout_s = timeout_s

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               continue_final_message: bool = False, template: str | None = None,
               kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text; ChatTemplateError (a ValueError) for anything the template or the input gets wrong."""
        source = template if template is not None else self.template
        if not source:
            raise ChatTemplateError("this model's tokenizer has no chat template")
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError("continue_final_message needs add_generation_prompt=false")
        messages = [dict(m) for m in messages]
        final = ""
        if continue_final_message:
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise ChatTemplateError("continue_final_message needs a final message with text content")
            final = messages[-1]["content"]
            messages[-1]["content"] = final + _CONTINUE_TAG
        context = {**self.special_tokens, **(kwargs or {}), "messages": messages, "tools": None, "documents": None,
                   "add_generation_prompt": add_generation_prompt}
        rendered = self._run(source, context)
        return _cut_at_continue_tag(rendered, final) if continue_final_message else rendered

    def _run(self, source: str, context: dict[str, Any]) -> str:
        _limits.timeout_s, _limits.max_chars = self.timeout_s, self.max_chars
        _limits.deadline = time.monotonic() + self.timeout_s
        try:
            compiled = _compile(source)
            parts, size = [], 0
            for chunk in compiled.generate(**context):
                size += len(chunk)
                if size > self.max_chars:
                    raise ChatTemplateError(f"the chat template rendered more than {self.max_chars} characters")
                parts.append(chunk)
            return "".join(parts)
        except ChatTemplateError:
            raise
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template has a syntax error: {e.message} (line {e.lineno})") from None
        except Exception as e:  # whatever a template does wrong is the request's (or the model's) problem
            raise ChatTemplateError(f"cannot apply the chat template: {type(e).__name__}: {e}"[:500]) from None
        finally:
            _limits.deadline = None


def _cut_at_continue_tag(rendered: str, final: str) -> str:
    """transformers' continue_final_message: the prompt ends where the final message's text ends."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ChatTemplateError("continue_final_message: the chat template does not render the final message")
    loc = rendered.rindex(tag)
    return rendered[:loc] if rendered[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:loc].rstrip()

