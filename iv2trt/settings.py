"""Settings: YAML files under configs/ that users edit, every key overridable by a flag.

A script declares a dataclass whose fields are its settings (with `help` in the field metadata)
and the YAML sections it reads, e.g. ("model", "export"). `parse_settings` builds an argparse
parser from the dataclass (`--some-key` for `some_key`), reads `--config`, and returns the
merged settings: field defaults < YAML < command line. A dataclass with a `given_settings()` field learns there
which settings the user gave: flags, and keys of a --config file they named (the default config file's values
count as defaults).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .errors import PipelineError

T = TypeVar("T")
CONFIG_NAME = "internvideo2_clip_s14.yaml"
SECTIONS = ("model", "export", "build", "infer")  # of a config file; each stage reads some of them


def config_dir() -> Path:
    """configs/: the copy installed inside the package (pip install .), else the repository checkout's."""
    here = Path(__file__).resolve().parent
    installed, checkout = here / "configs", here.parent / "configs"
    return installed if (installed / CONFIG_NAME).is_file() else checkout


DEFAULT_CONFIG = config_dir() / CONFIG_NAME


def setting(default: Any, help: str, choices: Sequence[str] | None = None, const: Any = None) -> Any:
    """A dataclass field carrying its --help text (and allowed values; with `const`, the flag's value may be left
    out and means `const`)."""
    metadata = {"help": help, "choices": choices, "const": const}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def given_settings() -> Any:
    """A dataclass field that parse_settings fills with the names of the settings the user gave (neither a flag nor
    a config key itself)."""
    return dataclasses.field(default=frozenset(), compare=False, repr=False, metadata={"given": True})


def setting_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that are settings (flags and config keys)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("given")]


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) of annotations like `int`, `str | None`, `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def read_config(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file {path} not found: pass --config PATH (see configs/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"config file {path} is not valid YAML: {exc}") from exc
    known = ", ".join(SECTIONS)
    if not isinstance(data, dict):
        raise PipelineError(f"config file {path} must map section names ({known}) to key/value maps")
    for key, value in data.items():
        if key not in SECTIONS:
            what = "section" if isinstance(value, (dict, type(None))) else "top-level key"
            raise PipelineError(f"config file {path}: unknown {what} {key!r}; the sections are {known}, and every "
                                "key goes inside one of them (see configs/)")
        if not isinstance(value, (dict, type(None))):
            raise PipelineError(f"config file {path}: section {key!r} must be a map of keys to values")
    return {k: (v or {}) for k, v in data.items()}


def build_parser(cls: type, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML settings file; flags below override its keys (default: "
                                         f"{DEFAULT_CONFIG})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    hints = typing.get_type_hints(cls)
    for f in setting_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        inner, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} [config: {f.name}; default: {default!r}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if inner is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if is_list:
            kwargs["nargs"] = "+"
        elif f.metadata.get("const") is not None:
            kwargs.update(nargs="?", const=f.metadata["const"])
        parser.add_argument(flag, type=inner if inner in (int, float) else str, **kwargs)
    return parser


def settings_from(cls: type[T], config: dict[str, dict[str, Any]], sections: Sequence[str],
                  overrides: dict[str, Any] | None = None) -> T:
    """Merge `sections` of a parsed config file and `overrides` into `cls`, rejecting unknown keys."""
    names = {f.name for f in setting_fields(cls)}
    values: dict[str, Any] = {}
    for section in sections:
        data = config.get(section, {})
        unknown = sorted(set(data) - names)
        if unknown:
            raise PipelineError(f"unknown key(s) {unknown} in section '{section}' of the config; "
                                f"known keys: {sorted(names)}")
        values.update(data)
    values.update(overrides or {})
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        inner, is_list = _base_type(hints[key])
        if is_list and value is not None and not isinstance(value, list):
            values[key] = [value]
        if inner is Path and value is not None:
            values[key] = Path(value)
    settings = cls(**values)
    for f in setting_fields(cls):
        choices = f.metadata.get("choices")
        if choices and getattr(settings, f.name) not in choices:
            raise PipelineError(f"{f.name} must be one of {list(choices)}, got {getattr(settings, f.name)!r}")
    return settings


def parse_settings(cls: type[T], sections: Sequence[str], description: str, argv: Sequence[str] | None = None,
                   epilog: str | None = None) -> T:
    """Parse the command line of a stage script into its settings dataclass."""
    parser = build_parser(cls, description, epilog)
    args = vars(parser.parse_args(argv))
    config_path, verbose = args.pop("config"), args.pop("verbose")
    setup_logging(verbose)
    config = read_config(config_path or DEFAULT_CONFIG)
    settings = settings_from(cls, config, sections, args)
    given = set(args) | ({key for section in sections for key in config.get(section, {})} if config_path else set())
    for f in dataclasses.fields(cls):
        if f.metadata.get("given"):
            setattr(settings, f.name, frozenset(given))
    return settings


def setup_logging(verbose: bool = False, tag: str = "") -> None:
    """Log lines to stderr (debug with `verbose`); `tag` marks the lines of one process among several (a
    pipeline process of the local job)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {tag + ' ' if tag else ''}%(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    # the ONNX exporter's optimiser logs every rewrite at INFO; keep only its warnings
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch._export", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
