"""Procedurally generated function tasks: a task family on which learning can generalise.

Each template is a small Python function with parameters (a constant, an operator,
a character, a list shape) and a pool of names. An instance fills them in and comes
with its prompt, a reference solution and unit tests computed from that reference.

The split is by parameter, not by instance: every template's constants are
divided into a training part and a held-out part, so a held-out task asks for a
constant the training set never showed with that template (under one of the
template's function names). A policy that only memorises its training tasks
scores nothing there; one that learned to read the constant from the prompt does.

``rlaif-mlx make-tasks`` writes the two files; the bundled ones
(``builtin:families_train.jsonl``, ``builtin:families_heldout.jsonl``) are its
output for seed 0 (a test checks that they still are).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .tasks import Task

HELDOUT_SHARE = 0.25
"""The share of each template's constants kept for the held-out set."""


@dataclass(frozen=True)
class Template:
    """One family of tasks.

    Attributes:
        family: its name (the task ids start with it).
        names: the pool of function names.
        constants: the pool of the constant it varies.
        prompt: the instruction, with ``{name}`` and ``{k}``.
        code: the reference body's source, with ``{name}`` and ``{k}``.
        inputs: draws the arguments of one test call from a random source, given the constant
            (so some draws land where this constant and its rivals give different answers).
        difficulty: 1 (easiest) to 3, for the curriculum.
    """

    family: str
    names: tuple[str, ...]
    constants: tuple[int | str, ...]
    prompt: str
    code: str
    inputs: Callable[[random.Random, int | str], tuple]
    difficulty: int


def _int_near(rng: random.Random, k: int) -> int:
    """Anywhere in -50..50, or a multiple of k, or next to k: where constants are told apart."""
    draw = rng.random()
    if draw < 0.4:
        return rng.randint(-50, 50)
    if draw < 0.7:
        return k * rng.randint(-3, 3)
    return k + rng.randint(-3, 3)


def _ints(rng: random.Random, k: int) -> tuple:
    return (_int_near(rng, k),)


def _int_list(rng: random.Random, k: int) -> tuple:
    return ([rng.randint(-12, 12) if rng.random() < 0.6 else k + rng.randint(-2, 2) for _ in range(rng.randint(0, 7))],)


def _word(rng: random.Random, k: int | str) -> tuple:
    letters = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(0, 9))]
    if isinstance(k, str) and rng.random() < 0.5:  # the letter itself, at the start now and then
        letters.insert(0 if rng.random() < 0.3 else rng.randint(0, len(letters)), k)
    return ("".join(letters),)


def _pool(words: str) -> tuple[str, ...]:
    return tuple(words.split())


_DIGITS = tuple(range(2, 42))
_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")

TEMPLATES: tuple[Template, ...] = (
    Template(
        "add",
        _pool("add_const plus_k shift_up increase bump offset_value step_up raise_by add_on lift push_up incr"),
        _DIGITS,
        "Write a Python function `{name}(x)` that returns x plus {k}.",
        "def {name}(x):\n    return x + {k}\n",
        _ints,
        1,
    ),
    Template(
        "sub",
        _pool("sub_const minus_k shift_down decrease lower take_away step_down drop_by reduce cut_by push_down decr"),
        _DIGITS,
        "Write a Python function `{name}(x)` that returns x minus {k}.",
        "def {name}(x):\n    return x - {k}\n",
        _ints,
        1,
    ),
    Template(
        "mul",
        _pool("times_k scale multiply grow amplify stretch magnify boost enlarge widen expand inflate"),
        _DIGITS,
        "Write a Python function `{name}(x)` that returns x multiplied by {k}.",
        "def {name}(x):\n    return x * {k}\n",
        _ints,
        1,
    ),
    Template(
        "mod",
        _pool("remainder mod_k wrap cycle modulo rest_of leftover residue fold clock wrap_around rem"),
        _DIGITS,
        "Write a Python function `{name}(x)` that returns the remainder of x divided by {k}.",
        "def {name}(x):\n    return x % {k}\n",
        _ints,
        1,
    ),
    Template(
        "divisible",
        _pool(
            "divisible is_multiple divides fits_k even_split is_factor splits multiple_of "
            "clean_cut no_rest shares_k is_divisible"
        ),
        _DIGITS,
        "Write a Python function `{name}(x)` that returns True if x is divisible by {k}, else False.",
        "def {name}(x):\n    return x % {k} == 0\n",
        _ints,
        2,
    ),
    Template(
        "above",
        _pool(
            "count_above how_many_over tally_high count_big over_k num_greater "
            "count_exceeding bigger_count count_high tally_over above_k num_above"
        ),
        tuple(range(-8, 12)),
        "Write a Python function `{name}(xs)` that returns how many numbers in the list xs are greater than {k}.",
        "def {name}(xs):\n    return sum(1 for x in xs if x > {k})\n",
        _int_list,
        2,
    ),
    Template(
        "addall",
        _pool(
            "add_to_all shift_all map_plus raise_all offset_all bump_each plus_each add_each "
            "lift_all push_all add_every shift_each"
        ),
        _DIGITS,
        "Write a Python function `{name}(xs)` that returns a new list with {k} added to every number in the list xs.",
        "def {name}(xs):\n    return [x + {k} for x in xs]\n",
        _int_list,
        2,
    ),
    Template(
        "repeat",
        _pool("repeat echo copies duplicate multiply_text times_text stamp chant loop_text replicate again reprint"),
        tuple(range(2, 12)),
        "Write a Python function `{name}(s)` that returns the string s repeated {k} times.",
        "def {name}(s):\n    return s * {k}\n",
        _word,
        1,
    ),
    Template(
        "count_char",
        _pool(
            "count_char tally_letter letter_count occurrences how_many count_of frequency "
            "num_times char_total hits letter_hits tally"
        ),
        _LETTERS,
        "Write a Python function `{name}(s)` that returns how many times the letter '{k}' appears in the string s.",
        "def {name}(s):\n    return s.count('{k}')\n",
        _word,
        2,
    ),
    Template(
        "suffix",
        _pool(
            "add_suffix append_letter end_with tail_tag extend close_with pad_end finish_with "
            "tack_on append_char trail seal"
        ),
        _LETTERS,
        "Write a Python function `{name}(s)` that returns the string s with the letter '{k}' added at the end.",
        "def {name}(s):\n    return s + '{k}'\n",
        _word,
        1,
    ),
    Template(
        "starts",
        _pool(
            "starts_with begins_with has_prefix opens_with leads_with first_is starts_on "
            "heads_with front_is leading prefix_is initial_is"
        ),
        _LETTERS,
        "Write a Python function `{name}(s)` that returns True if the string s starts with the letter '{k}', "
        "else False.",
        "def {name}(s):\n    return s.startswith('{k}')\n",
        _word,
        2,
    ),
    Template(
        "clip",
        _pool("cap clip_high at_most limit ceiling bound_above saturate top_out no_more max_out clamp_top upper_cap"),
        _DIGITS,
        "Write a Python function `{name}(x)` that returns x, but never more than {k}.",
        "def {name}(x):\n    return min(x, {k})\n",
        _ints,
        3,
    ),
)


def _split(values: tuple, rng: random.Random) -> tuple[list, list]:
    """A shuffled split of ``values`` into (train, held-out), the held-out part at least one."""
    shuffled = list(values)
    rng.shuffle(shuffled)
    cut = max(1, round(len(shuffled) * HELDOUT_SHARE))
    return shuffled[cut:], shuffled[:cut]


MIN_TESTS = 5
MAX_DRAWS = 4000


def _function(template: Template, k: int | str) -> Callable:
    namespace: dict = {}
    exec(compile(template.code.format(name="f", k=k), "<reference>", "exec"), namespace)  # our own template
    return namespace["f"]


def _calls(template: Template, k: int | str, rng: random.Random) -> list[tuple[tuple, object]]:
    """Test calls ``(args, expected)`` that no rival passes: the template with any other of its
    constants (a policy that wrote a training task's constant), or a function that returns one value.

    Draws inputs until every rival fails at least one call and two calls expect different values,
    keeping the first ``MIN_TESTS``, then only those that catch a rival not yet caught or bring a second value.

    Raises:
        ValueError: the template's inputs cannot tell this constant from a rival (a generator bug).
    """
    function = _function(template, k)
    rivals = {other: _function(template, other) for other in template.constants if other != k}
    calls: list[tuple[tuple, object]] = []
    seen: set[str] = set()
    for _ in range(MAX_DRAWS):
        args = template.inputs(rng, k)
        if repr(args) in seen:
            continue
        expected = function(*args)
        caught = [other for other, rival in rivals.items() if rival(*args) != expected]
        values = {repr(value) for _, value in calls}
        if caught or len(calls) < MIN_TESTS or (len(values) < 2 and repr(expected) not in values):
            seen.add(repr(args))
            calls.append((args, expected))
            for other in caught:
                del rivals[other]
        if not rivals and len(calls) >= MIN_TESTS and len({repr(v) for _, v in calls}) >= 2:
            return calls
    raise ValueError(f"{template.family} {k!r}: its inputs do not tell it from {sorted(map(str, rivals))[:3]}")


def _task(template: Template, name: str, k: int | str, part: str, rng: random.Random) -> Task:
    code = template.code.format(name=name, k=k)
    tests = [
        f"assert {name}({', '.join(map(repr, args))}) == {expected!r}" for args, expected in _calls(template, k, rng)
    ]
    return Task(
        id=f"{template.family}-{part}-{name}-{k}",
        prompt=template.prompt.format(name=name, k=k),
        language="python",
        tests="\n".join(tests) + "\n",
        entry_point=name,
        reference=code,
        difficulty=float(template.difficulty),
    )


def generate_tasks(*, seed: int = 0) -> tuple[list[Task], list[Task]]:
    """Every (name, constant) pair of every template, split by constant into (train, held-out).

    Training tasks use the training constants only; held-out tasks the held-out constants only,
    so no held-out constant appears with its template in training. Each held-out task takes one
    of the template's names, drawn at random.

    Args:
        seed: decides the splits and the test inputs.

    Returns:
        ``(train, heldout)``, each sorted by id.
    """
    rng = random.Random(seed)
    train: list[Task] = []
    heldout: list[Task] = []
    for template in TEMPLATES:
        constants_train, constants_held = _split(template.constants, rng)
        for name in template.names:
            for k in constants_train:
                train.append(_task(template, name, k, "train", random.Random(f"{seed}/{template.family}/{name}/{k}")))
        for k in constants_held:
            for name in rng.sample(template.names, 3):
                heldout.append(
                    _task(template, name, k, "heldout", random.Random(f"{seed}/{template.family}/{name}/{k}"))
                )
    return sorted(train, key=lambda t: t.id), sorted(heldout, key=lambda t: t.id)


def task_line(task: Task) -> str:
    """One JSONL line for a task, in the task-file format."""
    fields = {
        "id": task.id,
        "prompt": task.prompt,
        "language": task.language,
        "entry_point": task.entry_point,
        "tests": task.tests,
        "reference": task.reference,
        "difficulty": task.difficulty,
    }
    return json.dumps(fields) + "\n"


def write_task_files(folder: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Writes ``families_train.jsonl`` and ``families_heldout.jsonl`` into ``folder``; returns their paths.

    Raises:
        FileExistsError: either file is already there (nothing is overwritten).
    """
    folder = Path(folder)
    train, heldout = generate_tasks(seed=seed)
    paths = (folder / "families_train.jsonl", folder / "families_heldout.jsonl")
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} already exists; choose another folder (nothing was written)")
    folder.mkdir(parents=True, exist_ok=True)
    for path, tasks in zip(paths, (train, heldout), strict=True):
        path.write_text("".join(task_line(t) for t in tasks), encoding="utf-8")
    return paths
