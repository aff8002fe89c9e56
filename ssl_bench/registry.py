"""Declarative registries: ``backbones/*.yaml`` (one file per family), ``tasks/*.yaml`` (one per method) and
``stages/{segmenters,filters,embeddings,clusterers}/*.yaml`` (one per composable stage of a method).

Entries come from three places, read in this order: the built-in folders, the user's registry folders (same
layout; ``--registry DIR`` or ``$SSL_BENCH_REGISTRY``, several separated by ``:``) and the Python entry points of
installed packages (groups ``ssl_bench.backbones``, ``ssl_bench.tasks``, ``ssl_bench.stages``; see
``entry_point_entries``). A name registered twice, wherever, is one error naming both sources. Backbones may also
be named without an entry: ``timm:NAME``, ``hf:REPO``, ``open_clip:ARCH/TAG`` (``HUB_SCHEMES``).

The runner, store and reports only ever see the dataclasses below; the code behind an entry is
named by its ``entrypoint`` ("module:function") and imported when first needed.

A task may have *stage slots* (``stages: {segmenter: segmenter, embed: embedding, clusterer: clusterer}``):
the parameter named by a slot holds a registered stage of that kind, and the chosen stage's parameters join
the task's under the slot's name (``segmenter.tau``, ``clusterer.metric``), so ``-p segmenter=dsm
-p segmenter.eigenvectors=4`` composes a method and every choice is in the run's configuration and hash.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import json
import dataclasses
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

from .errors import UserError
from .kbounds import KBound

_CHECKOUT = Path(__file__).resolve().parent.parent
_PACKAGED = Path(__file__).resolve().parent / "_registry"


def registry_dir(kind: str) -> Path:
    """Folder of a registry: the checkout's top-level folder, else the copy packed into the wheel."""
    for base in (_CHECKOUT, _PACKAGED):
        if (base / kind).is_dir():
            return base / kind
    raise UserError(f"registry folder '{kind}/' not found next to the package -- reinstall ssl-bench")


def slot_params(params: dict, slot: str) -> dict:
    """The parameters of the stage in ``slot`` of a composed task's parameters (``slot.key`` keys)."""
    prefix = slot + "."
    return {key[len(prefix):]: v for key, v in params.items() if key.startswith(prefix)}


def _not_importable(path: str, err: Exception) -> UserError:
    module = path.partition(":")[0]
    if isinstance(err, ModuleNotFoundError) and err.name and module.split(".")[0] == err.name.split(".")[0]:
        fix = (f"make module {module} importable (pip install its package, or add the folder holding it to "
               f"PYTHONPATH: a registry folder is not on the import path), or fix the registry file")
    else:
        fix = "check the registry file"
    return UserError(f"entrypoint '{path}' cannot be imported ({err}) -- {fix}")


def load_entrypoint(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise _not_importable(path, err) from err


def check_findable(path: str) -> None:
    """One line now when the module of entrypoint ``path`` is not on the import path, found without running it
    (a planning process, e.g. a Ray driver, need not import what only the workers run)."""
    module = path.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as err:  # a parent package missing
        raise _not_importable(path, err) from None
    if not found:
        raise _not_importable(path, ModuleNotFoundError(f"No module named '{module}'", name=module))


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: everything a user needs to know, and where its weights come from."""

    name: str
    family: str
    builder: str  # "module:function" building the model from (spec, state_dict | None)
    arch: str  # architecture id understood by the builder (timm name, torchvision name, ...)
    patch_size: int  # patch size, or output stride for CNNs
    embed_dim: int
    params_m: float  # parameters in millions (checked against the built model by the tests)
    pretraining_data: str
    licence: str
    heads: int = 0  # 0 for models without attention
    input_size: int = 224  # the model's pre-training resolution
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    timm: str | None = None  # timm model name with pretrained tag
    hf: str | None = None  # Hugging Face model id
    url: str | None = None  # official checkpoint URL
    sha256: str | None = None
    file: str | None = None  # file name expected under $SSL_BENCH_WEIGHTS
    checkpoint: dict = field(default_factory=dict)  # layout: wrappers, prefixes, key renames
    options: dict = field(default_factory=dict)  # builder options (e.g. registers, dilation)
    paper: str = ""
    files: tuple[str, ...] = ()  # file names to look for in a hub cache folder (default: see models/weights.py)
    source: str = field(default="", compare=False)  # the registry file (or entry point) that registered it

    @property
    def has_attention(self) -> bool:
        return self.heads > 0


STAGE_KINDS = {"segmenter": "segmenters", "filter": "filters", "embedding": "embeddings",
               "clusterer": "clusterers"}  # kind -> folder


@dataclass(frozen=True)
class StageSpec:
    """One registered stage (a segmenter, region embedding or clusterer) that composed tasks plug in."""

    name: str
    kind: str  # a key of STAGE_KINDS
    title: str
    entrypoint: str  # "module:Class" (see ssl_bench/stages/__init__.py for what each kind implements)
    features: tuple[str, ...] = ()  # cached kinds it reads; "{param}" = the kind its parameter ``param`` names (none if null)
    params: dict = field(default_factory=dict)
    paper: str = ""
    validate: str | None = None  # "module:function(params)" raising UserError
    version: int = 1  # raised when the stage's numbers change (a run of another version is not reused)
    value_versions: dict = field(default_factory=dict)  # versions of some values only (see _check_value_versions)
    benchmark: str | None = None  # "module:function" measured by `ssl-bench bench` (see bench.available_benchmarks)
    k_bound: KBound | None = None  # a segmenter's items (segments, proposals): what bounds K in a task using it
    uses_labels: bool = False  # predicts from the ground truth (a labelled probe): so does a task using it
    source: str = field(default="", compare=False)  # the registry file (or entry point) that registered it

    def features_for(self, params: dict) -> tuple[str, ...]:
        return tuple(f.format(**params) if "{" in f else f for f in self.features
                     if "{" not in f or params.get(f.strip("{}")) is not None)


@dataclass(frozen=True)
class TaskSpec:
    """One registered task (method or method variant)."""

    name: str
    title: str
    entrypoint: str
    features: tuple[str, ...]
    params: dict
    paper: str = ""
    benchmark: str | None = None  # "module:function" measured by `ssl-bench bench TASK`
    validate: str | None = None  # "module:function(params)" raising UserError, called before any work
    version: int = 1  # raised when the method's numbers change: stored cells of other versions are not reused
    value_versions: dict = field(default_factory=dict)  # versions of some values only (see _check_value_versions)
    stages: dict = field(default_factory=dict)  # stage slots: parameter name -> stage kind (composed tasks)
    gpu: bool = True  # runs a model (backbone passes, training): on a Ray cluster with GPUs its cells hold one;
    # false: it computes on cached features with the CPU, and its cells run on the CPU and never hold a GPU
    k_bound: KBound = KBound()  # what its K clusters are made of (checked before any work, see kbounds.py)
    source: str = field(default="", compare=False)  # the registry file (or entry point) that registered it
    slow_on_cpu: dict | None = None  # {when: {param: value}, why, instead}: said before such a run starts on a CPU
    # "module:function(ctx, params)" -> a trained feature projection of this method (a segmentation head), which
    # another task reads as its input features (a ``features_from`` parameter); see methods/feature_source.py
    projection: str | None = None
    reads_projection: str | None = None  # its parameter naming a task whose projection it reads (whose versions count)
    # {param: [values]}: a run with one of these values makes its headline from ground truth (a probe, an oracle):
    # reports mark it and never count it "best" among the unsupervised rows
    uses_labels: dict = field(default_factory=dict)
    renamed: dict = field(default_factory=dict)  # {old name: new name} of parameters an earlier version had: hints

    def cpu_note(self, params: dict) -> str | None:
        """What to say before this task runs with ``params`` on a machine without a GPU (None: nothing)."""
        slow = self.slow_on_cpu
        if not slow or any(params.get(key) != value for key, value in slow["when"].items()):
            return None
        return f"{self.name} on a CPU: {slow['why']} -- {slow['instead']}"

    def check_findable(self, params: dict) -> None:
        """The task's module and its slots' stage modules are on the import path (one line otherwise)."""
        stages_chosen = [stage_spec(kind, params[slot], slot) for slot, kind in self.stages.items()
                         if isinstance(params.get(slot), str)]  # an optional slot may be empty (null)
        for entrypoint in [self.entrypoint] + [stage.entrypoint for stage in stages_chosen]:
            check_findable(entrypoint)

    def reads_ground_truth(self, params: dict) -> bool:
        """Whether a run with these parameters predicts from the ground truth (``uses_labels``)."""
        if any(params.get(key) in values for key, values in self.uses_labels.items()):
            return True
        return any(getattr(stages(kind).get(params.get(slot)), "uses_labels", False) for slot, kind in self.stages.items())

    def k_bound_for(self, params: dict) -> KBound:
        """What bounds K for a run with these (resolved) parameters: the task's own ``k_bound`` or, in a
        composed task, that of the last stage in its slots that declares one (its parameters named by the slot):
        the segmenter's regions, unless a later stage (a clusterer that names the classes) says otherwise."""
        for slot, kind in reversed(self.stages.items()):
            stage = stages(kind).get(params.get(slot))
            if stage is not None and stage.k_bound is not None:
                return stage.k_bound.in_slot(slot, self.k_bound.split)
        return self.k_bound

    def resolve_params(self, overrides: dict | None) -> dict:
        if self.stages:
            return self._resolve_composed(dict(overrides or {}))
        unknown = set(overrides or {}) - set(self.params)
        if unknown:
            raise UserError(
                f"task '{self.name}' has no parameter(s) {sorted(unknown)} -- known: {sorted(self.params)}"
                f"{self._renamed_hint(sorted(unknown)[0])}"
            )
        what = f"task '{self.name}' parameter"
        for key, value in (overrides or {}).items():
            check_like_default(what, key, value, self.params[key], "-p", counts_from=None)
        params = {**self.params, **(overrides or {})}
        if self.validate:  # a bad value fails now, not after an hour of feature extraction (and names its range)
            load_entrypoint(self.validate)(params)
        for key, value in (overrides or {}).items():  # counts the hook leaves unchecked: at least 0
            check_like_default(what, key, value, self.params[key], "-p")
        return params

    # -- composed tasks (stage slots) --
    def own_params(self) -> dict:
        """The task's parameters without the stage parameters its file sets (``slot.param`` keys)."""
        return {key: v for key, v in self.params.items() if "." not in key}

    def _renamed_hint(self, key: str) -> str:
        return f" ({key} is now {self.renamed[key]}: renamed by a later version)" if key in self.renamed else ""

    def _resolve_composed(self, overrides: dict) -> dict:
        dotted = {key: v for key, v in overrides.items() if "." in key}
        plain = {key: v for key, v in overrides.items() if "." not in key}
        own = self.own_params()
        unknown = set(plain) - set(own) | {key for key in dotted if key.split(".", 1)[0] not in self.stages}
        if unknown:
            first = sorted(unknown)[0]
            hint = self._renamed_hint(first) or _dotted_hint(first, self)
            raise UserError(f"task '{self.name}' has no parameter(s) {sorted(unknown)} -- known: {sorted(own)}"
                            f"{hint}")
        what = f"task '{self.name}' parameter"
        for key, value in plain.items():
            check_like_default(what, key, value, own[key], "-p", counts_from=None)
        params = {**own, **plain}
        for slot, kind in self.stages.items():
            stage = stage_spec(kind, params[slot], f"{what} {slot}")
            mine = slot_params(dotted, slot)
            params.update({f"{slot}.{key}": v for key, v in self._stage_params(slot, stage, mine).items()})
        if self.validate:
            load_entrypoint(self.validate)(params)
        for key, value in plain.items():
            check_like_default(what, key, value, own[key], "-p")
        return params

    def _stage_params(self, slot: str, stage: StageSpec, overrides: dict) -> dict:
        """The parameters of the stage in ``slot``: its defaults, the task file's ``slot.key`` values when the
        slot holds the task file's own stage (they were written for it), then the user's overrides."""
        defaults = dict(stage.params)
        if stage.name == self.params[slot]:
            defaults.update(slot_params(self.params, slot))
        unknown = set(overrides) - set(defaults)
        if unknown:
            raise UserError(f"{stage.kind} '{stage.name}' ({slot}) has no parameter(s) "
                            f"{sorted(f'{slot}.{k}' for k in unknown)} -- known: "
                            f"{sorted(f'{slot}.{k}' for k in defaults) or 'none'}")
        what = f"{stage.kind} '{stage.name}' parameter"
        for key, value in overrides.items():
            check_like_default(what, f"{slot}.{key}", value, defaults[key], "-p", counts_from=None)
        resolved = {**defaults, **overrides}
        if stage.validate:
            load_entrypoint(stage.validate)(resolved)
        for key, value in overrides.items():
            check_like_default(what, f"{slot}.{key}", value, defaults[key], "-p")
        return resolved

    def defaults_like(self, params: dict) -> dict:
        """What a label compares a run's parameters with: the task's own defaults (the stage in each slot
        included) and, for stage parameters, the defaults of the stages the run chose."""
        if not self.stages:
            return self.params
        try:
            chosen = self.resolve_params({slot: params[slot] for slot in self.stages if slot in params})
        except UserError:  # a stored run of a stage that is no longer registered
            chosen = {}
        return {**self.own_params(), **{key: v for key, v in chosen.items() if "." in key}}

    def features_for(self, params: dict) -> tuple[str, ...]:
        """The cached feature kinds a run with these (resolved) parameters reads: the task's own and its stages'."""
        kinds = list(self.features)
        for slot, kind in self.stages.items():
            stage = stages(kind).get(params.get(slot))
            if stage:
                kinds += stage.features_for(slot_params(params, slot))
        return tuple(dict.fromkeys(kinds))

    def stage_specs(self, params: dict) -> dict[str, StageSpec]:
        """The registered stage in each slot of a run with these parameters."""
        return {slot: stage_spec(kind, params.get(slot), slot) for slot, kind in self.stages.items()}


def _dotted_hint(key: str, spec: TaskSpec) -> str:
    """' (did you mean segmenter.tau?)' for a stage parameter given without its slot."""
    for slot, kind in spec.stages.items():
        stage = stages(kind).get(spec.params.get(slot))
        if stage and key in stage.params:
            return f" (stage parameters are named by their slot: did you mean {slot}.{key}?)"
    return ""


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = 3, 6, 6, 6, 60, 60


def counted(n: int, thing: str) -> str:
    """``1 cell``, ``2 cells``."""
    return f"{n} {thing}" + ("" if n == 1 else "s")


def brief(value) -> str:
    """``repr(value)`` cut to a line: an error message quotes what the user gave, never all of a huge value."""
    return _BRIEF.repr(value)


def is_scalar(value) -> bool:
    """A value one setting can take: text, a number, true/false or null (not a list or a mapping)."""
    return value is None or isinstance(value, (str, int, float, bool))


def is_number(value) -> bool:
    """An int or float (YAML's true/false are bools, which Python counts as ints)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_like_default(what: str, key: str, value, default, flag: str, counts_from: int | None = 0) -> None:
    """A value of the type its default has: a switch true/false, a count a whole number >= ``counts_from``
    (None: any whole number), a real a number. Text and null defaults are left to the reader's own checks
    (enumerations, alternatives)."""
    if isinstance(default, bool):
        wanted, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        wanted = "a whole number" + ("" if counts_from is None else f" >= {counts_from}")
        ok = is_whole(value) and (counts_from is None or value >= counts_from)
    elif isinstance(default, float):
        wanted, ok = "a number", is_number(value)
    else:
        return
    if not ok:
        example = f"{flag} {key}={str(default).lower() if isinstance(default, bool) else default}".strip()
        raise UserError(f"{what} {key}={brief(value)} must be {wanted} -- e.g. {example}")


MAX_YAML_VALUES = 100_000  # values a document may expand to (aliases counted as what they repeat)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (YAML keeps the last), and a
    document whose aliases expand to more than ``MAX_YAML_VALUES`` values (an "alias bomb": a few lines that
    stand for billions of entries, which any message quoting them would spell out) is refused."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Count the values ``root`` expands to, each node once (aliases share their node), without recursion."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = [] if isinstance(node, yaml.ScalarNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        if children_done:
            size[id(node)] = 1 + sum(size.get(id(c), MAX_YAML_VALUES + 1) for c in children)  # absent: a cycle
            if size[id(node)] > MAX_YAML_VALUES:
                raise yaml.YAMLError(f"the document expands to more than {MAX_YAML_VALUES:,} values (aliases "
                                     f"repeating aliases, line {node.start_mark.line + 1}) -- write the values out")
        elif id(node) not in size:
            size[id(node)] = MAX_YAML_VALUES + 1  # until counted: a node met again inside itself is a cycle
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)


def parse_yaml_value(text: str):
    """One value of a command-line ``key=value`` (YAML: numbers, booleans, lists ...), safely and boundedly."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _mapping_without_repeats(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[str] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def read_yaml_mapping(path: Path, what: str, example: str) -> dict:
    """The mapping in a YAML file (registry entries, sweep grids); anything else is one clear line."""
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file (not UTF-8) -- fix the {what}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({str(err).splitlines()[0]}) -- fix the {what}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping -- see {example}")
    return data


def _read_yaml(path: Path) -> dict:
    return read_yaml_mapping(path, "registry file", f"the other files in {path.parent}")


def _as_tuple(value, path: Path, key: str) -> tuple:
    return tuple(_as_list(value, path, key))


def _as_list(value, path: Path, key: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{path}: {key} must be a list, got {brief(value)} -- see the other files in {path.parent}")
    return list(value)


def _spec(cls, entry: dict, path: Path, what: str):
    """A registry dataclass from a file's mapping, every field of its declared type (str, int, float, bool,
    tuple, dict, or None where optional): a mistyped value is one line naming it, not an error at run time."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in entry if str(k) not in fields)
    required = [name for name, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.init]
    missing = [name for name in required if name not in entry]
    if unknown or missing:
        problem = "; ".join(([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
                            + ([f"missing key(s) {', '.join(missing)}"] if missing else []))
        keys = [name for name, f in fields.items() if f.init and name != "source"]  # source: the loader's
        raise UserError(f"{path}: bad {what}: {problem} -- keys: {', '.join(keys)} (required: {', '.join(required)})")
    spec = cls(**{str(k): v for k, v in entry.items()})
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value, hint = getattr(spec, f.name), hints[f.name]
        if not _has_type(value, hint):
            raise UserError(f"{path}: {what}: {f.name}={brief(value)} is not {_type_name(hint)} -- fix the registry file")
    return spec


def _has_type(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return is_number(value)
    if hint is int:
        return is_whole(value)
    if origin is tuple:
        item = args[0] if args else object
        return isinstance(value, tuple) and all(_has_type(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return hint is object or isinstance(value, hint)


def _type_name(hint) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in (typing.get_args(hint) or (hint,)))


def _check_version(path: Path, version) -> None:
    if type(version) is not int or version < 1:
        raise UserError(f"{path}: version must be a whole number, 1 or more, got {version!r} -- e.g. version: 2")


def _check_value_versions(spec, path: Path) -> None:
    """``value_versions: {NAME: {version: N, except: VALUE, when: {PARAM: VALUE}}}``: NAME a parameter of the entry
    or ``protocol.FIELD``, N at least 2 (1 is every value's version before a change), VALUE one NAME can take (a
    mistyped one would make every run, defaults included, a new version), ``when`` optional."""
    example = "value_versions: {restarts: {version: 2, except: 1, when: {backend: sknetwork}}}"
    for name, entry in spec.value_versions.items():
        protocol_field = isinstance(name, str) and name.startswith("protocol.")
        field_name = name.removeprefix("protocol.") if protocol_field else None
        if not (field_name in protocol_defaults() if protocol_field else name in spec.params):
            raise UserError(f"{path}: value_versions names {brief(name)}, neither a parameter ({sorted(spec.params)}) "
                            f"nor protocol.FIELD ({', '.join(protocol_defaults())}) -- e.g. {example}")
        when = entry.get("when", {}) if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or not {"version", "except"} <= set(entry) <= {"version", "except", "when"}
                or type(entry["version"]) is not int or entry["version"] < 2 or not isinstance(when, dict)
                or set(when) - set(spec.params)):
            raise UserError(f"{path}: value_versions.{name} needs version (2 or more), except (the value the change "
                            f"left alone) and may have when (values of this file's parameters) -- e.g. {example}")
        unchanged = entry["except"]
        if protocol_field:
            from .data.protocol import Protocol

            try:
                Protocol(**{field_name: unchanged})
            except UserError as err:
                raise UserError(f"{path}: value_versions.{name}: except={brief(unchanged)} is no value of the "
                                f"protocol ({err})") from None
        elif isinstance(spec.params[name], str) and not isinstance(unchanged, str):
            raise UserError(f"{path}: value_versions.{name}: except={brief(unchanged)} must be text, as its default "
                            f"{spec.params[name]!r}")
        else:
            check_like_default(f"{path}: value_versions.{name}:", "except", unchanged, spec.params[name], "",
                               counts_from=None)


@cache
def protocol_defaults() -> dict:
    from .data.protocol import Protocol  # the datasets package: imported when a registry file first needs it
    return {f.name: f.default for f in dataclasses.fields(Protocol)}


# ---- where registry documents come from -----------------------------------------------------------------

REGISTRY_ENV = "SSL_BENCH_REGISTRY"
ENTRY_POINT_GROUPS = {"backbones": "ssl_bench.backbones", "tasks": "ssl_bench.tasks", "stages": "ssl_bench.stages"}
_FLAT_EXAMPLE = "backbones/NAME.yaml (a family with models:), tasks/NAME.yaml, stages/<kind>s/NAME.yaml"


def user_registry_dirs() -> tuple[Path, ...]:
    """The user's registry folders, from ``$SSL_BENCH_REGISTRY`` (``--registry DIR`` puts its folders there, so
    subprocesses and Ray workers started from this process read the same entries)."""
    dirs = []
    for text in filter(None, os.environ.get(REGISTRY_ENV, "").split(os.pathsep)):
        path = Path(text).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"registry folder {text} (--registry or ${REGISTRY_ENV}) is not a folder -- give a folder "
                            f"of registry YAML files ({_FLAT_EXAMPLE})")
        dirs.append(path)
    return tuple(dict.fromkeys(dirs))


def use_registries(folders) -> None:
    """Read the registry entries of ``folders`` too (before those already in ``$SSL_BENCH_REGISTRY``), in this
    process and in what it starts."""
    given = [str(Path(f).expanduser().resolve()) for f in folders]
    for folder, text in zip(given, folders):
        if not Path(folder).is_dir():
            raise UserError(f"--registry {text} is not a folder -- give a folder of registry YAML files ({_FLAT_EXAMPLE})")
    old = [p for p in os.environ.get(REGISTRY_ENV, "").split(os.pathsep) if p]
    if given:
        os.environ[REGISTRY_ENV] = os.pathsep.join(dict.fromkeys(given + old))


def _user_files(kind: str) -> list[Path]:
    """A user folder's files of ``kind`` ("backbones", "tasks", "stages/<kind folder>"): those in the sub-folder
    of that name, as in the built-in layout, and the YAML files at the folder's top whose content is of that kind
    (a family with ``models:`` is backbones, a mapping with ``kind:`` a stage, anything else a task)."""
    files: list[Path] = []
    for folder in user_registry_dirs():
        files += sorted((folder / kind).glob("*.yaml"))
        for path in sorted(folder.glob("*.y*ml")):
            if _kind_of(_read_yaml(path)) == kind:
                files.append(path)
    return files


def _kind_of(data: dict) -> str:
    if "models" in data:
        return "backbones"
    if "kind" in data:
        return f"stages/{STAGE_KINDS.get(data['kind'], data['kind'])}"
    return "tasks"


@cache
def _entry_point_documents(group: str) -> tuple[tuple[str, dict], ...]:
    """(source, mapping) of every document an installed package's entry point of ``group`` gives. An entry point
    names a mapping in the YAML files' format, a list of them, a path to a YAML file or folder, or a function
    returning one of those (``[project.entry-points."ssl_bench.backbones"] mine = "my_pkg.bench:BACKBONES"``)."""
    from importlib.metadata import entry_points

    found = []
    for point in sorted(entry_points(group=group), key=lambda p: p.name):
        dist = getattr(point.dist, "name", None)
        source = f"entry point '{point.name}' ({point.value}{f', package {dist}' if dist else ''})"
        try:
            obj = point.load()
            obj = obj() if callable(obj) else obj
        except Exception as err:  # noqa: BLE001 -- a broken plug-in is one line naming it, not a traceback
            raise UserError(f"{source} of group {group} cannot be loaded ({type(err).__name__}: {err}) -- fix or "
                            f"uninstall that package") from None
        found += list(_documents_of(obj, source))
    return tuple(found)


def _documents_of(obj, source: str) -> Iterator[tuple[str, dict]]:
    if isinstance(obj, dict):
        yield source, obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _documents_of(item, source)
    elif isinstance(obj, (str, Path)) and Path(obj).is_dir():
        for path in sorted(Path(obj).rglob("*.y*ml")):
            yield str(path), _read_yaml(path)
    elif isinstance(obj, (str, Path)) and Path(obj).is_file():
        yield str(obj), _read_yaml(Path(obj))
    else:
        raise UserError(f"{source} gives {type(obj).__name__} {str(obj)[:60]!r} -- an entry point names a mapping "
                        f"in the registry YAML format, a list of them, or a path to YAML files")


def folder_documents(folder: Path) -> Iterator[tuple[str, dict]]:
    """(path, mapping) of the registry files in one folder."""
    for path in sorted(Path(folder).glob("*.yaml")):
        yield str(path), _read_yaml(path)


def _documents(kind: str) -> Iterator[tuple[str, dict]]:
    """(source, mapping) of every registry document of ``kind``, built-in first, then the user's folders, then
    installed packages' entry points."""
    top, _, sub = kind.partition("/")
    builtin = registry_dir(top) / sub if sub else registry_dir(top)
    for path in sorted(builtin.glob("*.yaml")) + _user_files(kind):
        yield str(path), _read_yaml(path)
    for source, data in _entry_point_documents(ENTRY_POINT_GROUPS[top]):
        if top != "stages" or _kind_of(data) == kind:
            yield source, dict(data)


def _per_registry_set(load: Callable) -> Callable:
    """``load`` memoised per set of user registry folders (which the environment may change between calls);
    ``.cache_clear()`` forgets everything, entry points included (a package installed meanwhile)."""
    memo: dict = {}

    @functools.wraps(load)
    def cached(*args):
        key = (args, user_registry_dirs())
        if key not in memo:
            memo[key] = load(*args)
        return memo[key]

    def cache_clear() -> None:
        memo.clear()
        _entry_point_documents.cache_clear()

    cached.cache_clear = cache_clear
    return cached


def refresh() -> None:
    """Read every registry again (user folders edited, a package installed since the first read)."""
    for loader in (backbones, tasks, stages):
        loader.cache_clear()


# ---- the registries ---------------------------------------------------------------------------------------

@_per_registry_set
def backbones() -> dict[str, BackboneSpec]:
    """All registered backbones; a family file gives defaults shared by its ``models``."""
    return backbones_in(_documents("backbones"))


def backbones_in(documents: Iterable[tuple[str, dict]]) -> dict[str, BackboneSpec]:
    """The backbones of registry ``documents`` ((source, mapping) pairs; ``folder_documents`` reads a
    folder's)."""
    specs: dict[str, BackboneSpec] = {}
    for path, data in documents:
        shared = {k: v for k, v in data.items() if k != "models"}
        models = data.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise UserError(f"{path}: models must be a list of mappings -- see backbones/dino.yaml")
        for model in models:
            entry = {**shared, **model, "source": str(path)}
            for key in ("mean", "std", "files"):
                if key in entry:
                    entry[key] = _as_tuple(entry[key], path, key)
            spec = _spec(BackboneSpec, entry, path, f"backbone entry {brief(model.get('name'))}")
            if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
                raise UserError(f"{path}: {spec.name}: mean and std need 3 numbers (R, G, B; std above 0), got "
                                f"{brief(spec.mean)} and {brief(spec.std)}")
            if min(spec.patch_size, spec.embed_dim, spec.input_size) < 1 or spec.heads < 0:
                raise UserError(f"{path}: {spec.name}: patch_size, embed_dim and input_size must be 1 or more, heads 0 "
                                f"or more")
            if str(spec.name).partition(":")[0] in HUB_SCHEMES:
                raise UserError(f"{path}: backbone name '{spec.name}' starts with a hub prefix "
                                f"({', '.join(s + ':' for s in HUB_SCHEMES)}) -- choose another name")
            _register(specs, spec, path)
    return specs


@_per_registry_set
def tasks() -> dict[str, TaskSpec]:
    """All registered tasks; ``variants`` in a task file register more names with other params."""
    return tasks_in(_documents("tasks"))


def tasks_in(documents: Iterable[tuple[str, dict]]) -> dict[str, TaskSpec]:
    """The tasks of registry ``documents`` ((source, mapping) pairs; ``folder_documents`` reads a folder's)."""
    specs: dict[str, TaskSpec] = {}
    for path, data in documents:
        variants = _as_list(data.pop("variants", []) or [], path, "variants")
        data["features"] = _as_tuple(data.get("features", ()), path, "features")
        data.setdefault("params", {})
        data["k_bound"] = KBound.parse(data.get("k_bound"), data["params"], str(path))
        _check_version(path, data.get("version", 1))  # before the type check: its own message
        base = _spec(TaskSpec, {**data, "source": str(path)}, path, "task entry")
        _check_value_versions(base, path)
        if base.reads_projection is not None and base.reads_projection not in base.params:
            raise UserError(f"{path}: reads_projection names '{base.reads_projection}', not one of its parameters "
                            f"({sorted(base.params)}) -- e.g. reads_projection: features_from")
        _check_slots(base, path)
        _check_gpu(base.gpu, path, base.name)
        _check_slow_on_cpu(base.slow_on_cpu, base.params, path)
        _check_uses_labels(base.uses_labels, base.params, path)
        _check_renamed(base, path)
        _register(specs, base, path)
        for variant in variants:
            _register(specs, _variant(base, variant, path), path)
    return specs


def _check_slots(spec: TaskSpec, path: Path) -> None:
    """A composed task names a registered stage in each slot, and its ``slot.key`` values are that stage's."""
    for slot, kind in spec.stages.items():
        if kind not in STAGE_KINDS or slot not in spec.params:
            raise UserError(f"{path}: stage slot '{slot}' needs a kind ({', '.join(STAGE_KINDS)}) and a default "
                            f"stage in params -- e.g. stages: {{segmenter: segmenter}}, params: {{segmenter: louvain}}")
        stage = stage_spec(kind, spec.params[slot], f"{path}: slot {slot}")
        for key, value in spec.params.items():
            slot_of, _, name = key.partition(".")
            if name and slot_of == slot:
                if name not in stage.params:
                    raise UserError(f"{path}: '{key}' is not a parameter of {kind} '{stage.name}' -- known: "
                                    f"{sorted(stage.params)}")
                check_like_default(f"{path}: parameter", key, value, stage.params[name], "")
    stray = [key for key in spec.params if "." in key and key.split(".", 1)[0] not in spec.stages]
    if stray:
        raise UserError(f"{path}: parameter(s) {stray} name no stage slot -- slots: {sorted(spec.stages) or 'none'}")


@_per_registry_set
def stages(kind: str) -> dict[str, StageSpec]:
    """The registered stages of one kind (``stages/<kind folder>/*.yaml``, one per stage; ``variants`` register
    more names with other parameters)."""
    return stages_in(_documents(f"stages/{STAGE_KINDS[kind]}"), kind)


def stages_in(documents: Iterable[tuple[str, dict]], kind: str) -> dict[str, StageSpec]:
    """The stages of one kind in registry ``documents`` ((source, mapping) pairs; ``folder_documents``
    reads a folder's)."""
    specs: dict[str, StageSpec] = {}
    for path, data in documents:
        variants = _as_list(data.pop("variants", []) or [], path, "variants")
        data["features"] = _as_tuple(data.get("features", ()), path, "features")
        data.setdefault("params", {})
        data.setdefault("kind", kind)
        if "k_bound" in data:
            data["k_bound"] = KBound.parse(data["k_bound"], data["params"], str(path))
        if data["kind"] != kind:
            raise UserError(f"{path}: kind {brief(data['kind'])} in the {STAGE_KINDS[kind]} folder -- move the file "
                            f"or fix its kind")
        base = _spec(StageSpec, {**data, "source": str(path)}, path, "stage entry")
        _check_version(path, base.version)
        _check_value_versions(base, path)
        _register(specs, base, path)
        for variant in variants:
            _register(specs, _variant(base, variant, path), path)
    return specs


def stage_spec(kind: str, name, what: str = "stage") -> StageSpec:
    """A registered stage of ``kind`` by name; anything else is one line with suggestions."""
    if not isinstance(name, str):
        raise UserError(f"{what}={name!r} must name a registered {kind} -- see `ssl-bench list stages`")
    return lookup(stages(kind), name, kind)


def _check_slow_on_cpu(slow, params: dict, path: Path) -> None:
    example = "slow_on_cpu: {when: {denoiser: gpu}, why: ..., instead: use --task NAME-cpu}"
    if slow is None:
        return
    if (not isinstance(slow, dict) or set(slow) != {"when", "why", "instead"} or not isinstance(slow["when"], dict)
            or set(slow["when"]) - set(params)):
        raise UserError(f"{path}: slow_on_cpu needs when (parameter values of the task), why and instead -- "
                        f"e.g. {example}")


def _check_renamed(spec: TaskSpec, path: Path) -> None:
    """``renamed: {old: new}``: each new name is a parameter of the task or ``slot.key`` of its slot's stage."""
    for old, new in spec.renamed.items():
        slot, _, key = str(new).partition(".")
        if key and slot in spec.stages and spec.params.get(slot) is None:
            continue  # an optional slot, empty by default: its stage (and parameters) are the run's choice
        known = (key in stage_spec(spec.stages[slot], spec.params[slot]).params if key and slot in spec.stages
                 else new in spec.params)
        if not known:
            raise UserError(f"{path}: renamed: {old} -> {new} names no parameter of the task -- give the new name, "
                            f"e.g. renamed: {{tau: segmenter.tau}}")


def _check_uses_labels(uses: dict, params: dict, path: Path) -> None:
    if any(key not in params or not isinstance(values, list) for key, values in uses.items()):
        raise UserError(f"{path}: uses_labels maps parameters of the task to the values that read ground truth -- "
                        f"e.g. uses_labels: {{mode: [linear-probe, oracle]}}")


def _variant(base, variant, path: Path):
    """A registered variant: the base task under another name with some params changed (checked here,
    so a typo in a task file is one line at start-up, not a variant that silently runs the base task)."""
    example = "{name: kmeans-crf, title: ..., params: {crf: true}}"
    if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
        raise UserError(f"{path}: each variant needs a name -- e.g. {example}")
    keys = ("name", "title", "params", "gpu") if isinstance(base, TaskSpec) else ("name", "title", "params")
    unknown = set(variant) - set(keys)
    if unknown:
        raise UserError(f"{path}: variant '{variant['name']}' has unknown key(s) {sorted(unknown)} -- "
                        f"a variant has {', '.join(keys[:-1])} and {keys[-1]}, e.g. {example}")
    changes = variant.get("params") or {}
    slots = getattr(base, "stages", {})
    own = {key for key in changes if "." in key and key.split(".", 1)[0] in slots}  # checked by _check_slots
    if not isinstance(changes, dict) or set(changes) - set(base.params) - own:
        raise UserError(f"{path}: variant '{variant['name']}' params {changes!r} must be parameters of "
                        f"'{base.name}' -- known: {sorted(base.params)}")
    for key, value in changes.items():
        if key not in own:
            check_like_default(f"{path}: variant '{variant['name']}' parameter", key, value, base.params[key], "")
    params = {**base.params, **changes}
    for slot in slots:  # another stage in a slot: the base's values for that slot's stage do not apply to it
        if changes.get(slot, base.params.get(slot)) != base.params.get(slot):
            params = {k: v for k, v in params.items() if not k.startswith(slot + ".") or k in changes}
    spec = type(base)(**{**base.__dict__, "name": variant["name"], "title": variant.get("title", base.title),
                         "params": params})
    if isinstance(spec, TaskSpec):
        spec = replace(spec, gpu=variant.get("gpu", base.gpu))
        _check_gpu(spec.gpu, path, spec.name)
    if slots:
        _check_slots(spec, path)
    return spec


def _check_gpu(value, path: Path, name: str) -> None:
    if not isinstance(value, bool):  # "no" would be a true string: a CPU-only task holding a GPU
        raise UserError(f"{path}: task '{name}': gpu must be true or false, got {value!r} -- e.g. gpu: false")


def _register(specs: dict, spec, path) -> None:
    if spec.name in specs:  # the second would silently replace the first
        first = specs[spec.name].source
        where = f"in {path}" if str(first) == str(path) else f"by {first} and by {path}"
        raise UserError(f"the name '{spec.name}' is registered twice, {where} -- rename one of them")
    specs[spec.name] = spec


def overrides_text(actual: dict, defaults: dict) -> str:
    """``key=value, ...`` of the entries of ``actual`` that differ from ``defaults`` (sorted)."""
    diff = {k: v for k, v in sorted(actual.items()) if k not in defaults or defaults[k] != v}
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in diff.items())


def lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"see `ssl-bench list {what}s`"
    raise UserError(f"unknown {what} '{name}' -- {hint}")


# Backbones named without a registry entry: "scheme:rest" -> the function that describes that model.
HUB_SCHEMES = {"timm": "ssl_bench.models.hub:timm_spec", "hf": "ssl_bench.models.hub:hf_spec",
               "open_clip": "ssl_bench.models.hub:open_clip_spec"}


@functools.lru_cache(maxsize=64)
def _hub_spec(name: str) -> BackboneSpec:
    scheme, _, rest = name.partition(":")
    return load_entrypoint(HUB_SCHEMES[scheme])(rest)


def backbone(name: str) -> BackboneSpec:
    """A registered backbone, or one named through a hub (``timm:NAME``, ``hf:REPO``, ``open_clip:ARCH/TAG``)."""
    if not isinstance(name, str):
        raise UserError(f"a backbone name must be text, got {name!r} -- see `ssl-bench list backbones`")
    if name.partition(":")[0] in HUB_SCHEMES:
        return _hub_spec(name)
    return lookup(backbones(), name, "backbone")


def known_backbone(name: str) -> BackboneSpec | None:
    """The backbone of a stored run's name, or None where it is no longer known here (reports describe it then
    by its name only)."""
    try:
        return backbone(name)
    except UserError:
        return None


def task(name: str) -> TaskSpec:
    return lookup(tasks(), name, "task")
