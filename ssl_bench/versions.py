"""Which version of its method a run is: its task's version, its stages' and the versions of the values that a
change touched alone (``value_versions`` in a task or stage file). A run's config records the versions that
are not 1, so its hash changes with them and every hash stored before a version existed stays; a stored run of
another version is not reused, and reports label it with what is older (``[segmenter.restarts v1, not current]``).
"""

from __future__ import annotations

from . import registry
from .errors import UserError
from .registry import TaskSpec

NOT_CURRENT = "not current"  # in the label of a result of another version of its task, a stage or a value


def stage_versions(spec: TaskSpec, params: dict) -> dict[str, int]:
    """The versions of a composed run's stages that are not 1 (absent: the hashes of version-1 stages stay)."""
    versions = {slot: stage.version for slot, stage in spec.stage_specs(params).items()} if spec.stages else {}
    return {slot: v for slot, v in versions.items() if v != 1}


def outdated(config: dict) -> str | None:
    """What of a stored run's config another version than the registered one made, as its label says it: ``v1``
    (its task), ``segmenter v1`` (a stage), ``segmenter.restarts v1`` (a value); None for a current run (and
    for a task no longer registered: nothing to compare with)."""
    spec = registry.tasks().get(config["task"])
    if spec is None:
        return None
    if config.get("task_version", 1) != spec.version:
        return f"v{config.get('task_version', 1)}"
    params = config.get("params") or {}
    try:
        now = {"stage_versions": stage_versions(spec, params),
               "value_versions": value_versions(spec, params, config.get("protocol") or {})}
    except UserError:  # a stage (or a task it reads) that is no longer registered
        return "unregistered stage"
    for kind, current in now.items():
        stored = config.get(kind, {})
        for key in sorted(set(stored) | set(current)):
            if stored.get(key, 1) != current.get(key, 1):
                return f"{key} v{stored.get(key, 1)}"
    return None


def is_current_version(config: dict) -> bool:
    """Whether a run's config was stored by the registered version of its task, its stages and the values they
    version apart (unknown tasks: yes)."""
    return outdated(config) is None


def task_label(config: dict) -> str:
    """A run's task name, plus the parameters that differ from the registry's defaults: ``kmeans (iterations=20)``;
    a result of another version than the registered one says which: ``kmeans [v1, not current]``, ``datus2
    (segmenter.restarts=3) [segmenter.restarts v1, not current]``."""
    task, params = config["task"], config.get("params") or {}
    spec = registry.tasks().get(task)
    extra = registry.overrides_text(params, spec.defaults_like(params)) if spec else ""
    label = f"{task} ({extra})" if extra else task
    return label if (older := outdated(config)) is None else f"{label} [{older}, {NOT_CURRENT}]"


def value_versions(spec: TaskSpec, params: dict, protocol: dict) -> dict[str, int]:
    """The versions a run's values have where a change of numbers touched some values only (``value_versions``
    of its task and stages; the key is the parameter as the run names it): ``{"segmenter.restarts": 2}`` for a
    DatUS^2 run with restarts 3; empty for a run of the values the change left alone, whose hash so stays. A task
    that reads another's trained projection (``reads_projection``) adds that task's version (when not 1) and value
    versions under the parameter's name: ``{"features_from.protocol.precision": 2}``."""
    owners = [("", spec), *((slot + ".", stage) for slot, stage in spec.stage_specs(params).items())]
    versions = {}
    for prefix, owner in owners:
        for name, entry in owner.value_versions.items():
            if any(params.get(prefix + key) != value for key, value in entry.get("when", {}).items()):
                continue
            if name.startswith("protocol."):
                field_name = name.removeprefix("protocol.")
                value = protocol.get(field_name, registry.protocol_defaults()[field_name])
            else:
                value = params.get(prefix + name)
            if value != entry["except"]:
                versions[prefix + name] = entry["version"]
    if read := _read_task(spec, params):
        prefix = spec.reads_projection + "."
        versions |= {prefix + "version": read[0].version} if read[0].version != 1 else {}
        versions |= {prefix + key: v for key, v in value_versions(*read, protocol).items()}
    return versions


def _read_task(spec: TaskSpec, params: dict) -> tuple[TaskSpec, dict] | None:
    """(task, its resolved parameters) whose projection a run of ``spec`` reads: the value of its
    ``reads_projection`` parameter, read as ``features_from`` is (None: none)."""
    from .methods.feature_source import parse_features_from

    parsed = parse_features_from(params.get(spec.reads_projection), spec.name) if spec.reads_projection else None
    if parsed is None:
        return None
    read = registry.task(parsed[0])
    return read, read.resolve_params(parsed[1])
