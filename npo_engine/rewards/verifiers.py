"""Verifiers: functions that score one completion against its reference answer.

A verifier is any callable `(prompt, completion, answer) -> float`. The completion arrives as decoded text
with the EOS token's text already removed; the answer is `PromptRecord.answer`. Rewards are usually 0.0 or
1.0, but any finite float is accepted. A verifier may raise: the reward runner (`rewards/runner.py`) turns
that into reward 0.0 for the sample, counts it, and goes on.

Built-ins (`VERIFIERS`):
- `"exact_match"`: the stripped completion equals the stripped answer, or the content of the completion's
  last `\\boxed{...}` does. Nothing else is normalized (case, inner spaces, "3.0" vs "3").
- `"math"`: math-verify parses the answer and the completion into sympy and compares them, so "1/2",
  "0.5", "\\frac{1}{2}" and "the answer is \\boxed{1/2}" all match the answer "1/2". math-verify's own
  timeouts use `signal.alarm`, which only works in a process's main thread; we turn them off and rely on
  the runner's worker-process timeout instead, so this verifier is safe to call from any thread.

User verifiers are named by import path, `"package.module:function"`; the module must be importable in the
reward worker process too (installed, or on PYTHONPATH).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from typing import Any, Callable

Verifier = Callable[[str, str, str], float]
"""(prompt, completion, reference answer) -> reward."""

_BOXED = "\\boxed{"
# math-verify logs this once per process when its signal timeouts are off; our runner enforces timeouts.
_MATH_VERIFY_TIMEOUT_NOTICE = "Timeout is disabled"


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (nested braces allowed), or None if there is none
    or it is unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    i = start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def exact_match(prompt: str, completion: str, answer: str) -> float:
    """1.0 if the stripped completion, or the content of its last `\\boxed{}`, equals the stripped answer."""
    target = answer.strip()
    if completion.strip() == target:
        return 1.0
    boxed = last_boxed(completion)
    return 1.0 if boxed is not None and boxed.strip() == target else 0.0


def math_verify(prompt: str, completion: str, answer: str) -> float:
    """1.0 if math-verify finds the completion's final answer mathematically equal to the reference.

    Raises:
        ValueError: the reference answer does not parse (a data problem, so it is reported, not scored 0
            silently).
    """
    mv = _import_math_verify()
    gold = _parse_gold(answer)
    pred = mv.parse(completion, parsing_timeout=None)
    if not pred:
        return 0.0
    return 1.0 if mv.verify(list(gold), pred, timeout_seconds=None) else 0.0


@functools.lru_cache(maxsize=4096)  # every answer is checked G times per step (once per group member)
def _parse_gold(answer: str) -> tuple[Any, ...]:
    mv = _import_math_verify()
    # A bare answer ("1/2", "\\frac{1}{2}") is wrapped in \boxed{} so math-verify reads all of it as one
    # LaTeX expression, as verl does; answers that already carry \boxed or $...$ are parsed as written.
    text = answer if (_BOXED in answer or "$" in answer) else _BOXED + answer + "}"
    gold = mv.parse(text, parsing_timeout=None) or mv.parse(answer, parsing_timeout=None)
    if not gold:
        raise ValueError(
            f"math verifier cannot parse the reference answer {answer[:80]!r}; give answers math-verify can "
            f"read (a number or a LaTeX expression) or use the 'exact_match' verifier"
        )
    return tuple(gold)


class _DropTimeoutNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_MATH_VERIFY_TIMEOUT_NOTICE)


@functools.cache
def _import_math_verify() -> Any:
    try:
        import math_verify as mv
    except ImportError as e:
        raise ImportError("the 'math' verifier needs math-verify: pip install math-verify") from e
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutNotice())
    # The first parse compiles math-verify's regexes and warms sympy (about 0.3 s); pay it at import, not
    # inside the first timed verifier call.
    gold, pred = mv.parse("\\boxed{1}", parsing_timeout=None), mv.parse("1", parsing_timeout=None)
    mv.verify(gold, pred, timeout_seconds=None)
    return mv


VERIFIERS: dict[str, Verifier] = {"exact_match": exact_match, "math": math_verify}
_EXPECTED_FORM = "a built-in name or an import path 'package.module:function'"


def resolve_verifier(name_or_path: str) -> Verifier:
    """The verifier named `name_or_path`: a key of `VERIFIERS` or `"package.module:function"`.

    Resolving the built-in "math" imports and warms up math-verify (and sympy: one to two seconds), so a
    missing dependency fails here rather than at the first step.

    Raises:
        ValueError: an unknown name, a module or attribute that cannot be imported, or an object that is
            not callable with (prompt, completion, answer).
        ImportError: math-verify is missing for "math".
    """
    if not isinstance(name_or_path, str):
        raise ValueError(f"verifier must be a string, {_EXPECTED_FORM}; got {name_or_path!r}")
    if name_or_path in VERIFIERS:
        if name_or_path == "math":
            _import_math_verify()
        return VERIFIERS[name_or_path]
    if ":" not in name_or_path:
        raise ValueError(
            f"unknown verifier {name_or_path!r}; built-ins: {', '.join(sorted(VERIFIERS))}, or give "
            f"{_EXPECTED_FORM}"
        )
    module_name, _, attr_path = name_or_path.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"verifier {name_or_path!r} is not of the form 'package.module:function'")
    if module_name == "__main__":
        raise ValueError(
            f"verifier {name_or_path!r} lives in the script being run, which the reward worker process does "
            f"not run; move it into a module file and name it as 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user module can fail to import in any way; report them all alike
        raise ValueError(
            f"verifier {name_or_path!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
            f"install it or put its folder on PYTHONPATH (the reward worker process needs it too), and "
            f"use the form 'package.module:function'"
        ) from e
    fn: Any = module
    for part in attr_path.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError:
            raise ValueError(
                f"verifier {name_or_path!r}: module {module_name!r} has no attribute {attr_path!r} "
                f"(failed at {part!r}); use the form 'package.module:function'"
            ) from None
    if not callable(fn):
        raise ValueError(
            f"verifier {name_or_path!r} is not callable (type: {type(fn).__name__}); it must name a function "
            f"fn(prompt, completion, answer) -> float"
        )
    try:
        inspect.signature(fn).bind("", "", "")
    except TypeError:
        raise ValueError(
            f"verifier {name_or_path!r} has signature {inspect.signature(fn)}; it must accept three "
            f"positional arguments (prompt, completion, answer)"
        ) from None
    except ValueError:
        pass  # no signature to inspect (some C callables); the first call will tell
    return fn
