"""A paper's table layout over the cells of one sweep file: ``ssl-bench report --rows FILE``.

A sweep file may carry a ``table`` section naming labelled rows, each built from cells of the file's own task
entries (by their position in ``tasks``, from 0), and column groups, each read from one stream of a cell:

    table:
      title: PriMaPs-EM Table 1 rows
      columns: {Unsupervised: final, Linear probe: linear}    # group -> the stream it reads by default
      metrics: [acc, miou]                                     # per group (default: acc, miou)
      rows:
        - {label: Baseline, cells: {Unsupervised: 0, Linear probe: [1, final]}}   # entry 1's stream final
        - {label: + STEGO, cells: {Unsupervised: 3, Linear probe: 3}}

One block of rows per (dataset, backbone, K) of the grid; a value is the mean (± std) over the grid's seeds of
the stored runs (random-weight rows marked). Nothing here knows a method: a row only names entries and streams.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..versions import task_label
from .tables import Cell, Column, Table, _mean_std

METRIC_HEADERS = {"acc": "Acc", "miou": "mIoU", "f1": "F1"}


def _layout(table: dict, entries: int, source: str) -> tuple[str, dict, list[str], list[tuple[str, dict]]]:
    """(title, {group: default stream}, metrics, [(label, {group: (entry, stream)})]) of a ``table`` section,
    each mistake one line naming it."""
    where = f"{source}: table"
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list) or not isinstance(table.get("columns"), dict):
        raise UserError(f"{where} must be a mapping with columns (group: stream) and rows (label, cells) -- see "
                        f"examples/primaps-table1-heads.yaml")
    unknown = set(table) - {"title", "columns", "metrics", "rows"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} -- keys: title, columns, "
                        f"metrics, rows")
    metrics = table.get("metrics", ["acc", "miou"])
    if not isinstance(metrics, list) or not metrics or any(m not in METRIC_HEADERS for m in metrics):
        raise UserError(f"{where}: metrics must be a list of {', '.join(METRIC_HEADERS)}, got {metrics!r}")
    rows = []
    for i, row in enumerate(table["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("label"), str) or not isinstance(row.get("cells"), dict):
            raise UserError(f"{where}: row {i} needs a label and cells (group: task entry, or [entry, stream])")
        cells = {}
        for group, ref in row["cells"].items():
            if group not in table["columns"]:
                raise UserError(f"{where}: row {row['label']!r} names column group {group!r}, which columns lacks "
                                f"-- groups: {', '.join(map(str, table['columns']))}")
            entry, stream = (ref if isinstance(ref, list) and len(ref) == 2 else [ref, table["columns"][group]])
            if not (isinstance(entry, int) and 0 <= entry < entries) or not isinstance(stream, str):
                raise UserError(f"{where}: row {row['label']!r}, {group}: {ref!r} is not a task entry (0 to "
                                f"{entries - 1}) or [entry, stream]")
            cells[group] = (entry, stream)
        rows.append((row["label"], cells))
    return str(table.get("title", "Table")), dict(table["columns"]), metrics, rows


def rows_table(path: str | Path, runner, weights: str | None = None) -> Table:
    """The ``table`` section of sweep file ``path`` filled from ``runner``'s store (cells not stored: blank);
    ``weights``: the sweep's ``--weights`` (the default of every backbone without its own)."""
    from ..reproduce.compare import metric_value
    from ..sweep import Grid, _entries, expand, grid_from_mapping, read_grid_file, task_entry_choices

    source = str(path)
    data = read_grid_file(path)
    if "table" not in data:
        raise UserError(f"{source} has no table section -- add one (see examples/primaps-table1-heads.yaml) or run "
                        f"ssl-bench report without --rows")
    if weights:
        data["weights"] = weights
    grid = grid_from_mapping(data, source)
    entries = _entries(data, "tasks", source)
    title, groups, metrics, rows = _layout(data["table"], len(entries), source)
    choices = task_entry_choices(data, source)  # each entry's task choices (the grid's tasks, by entry)
    used = {entry for _, cells in rows for entry, _ in cells.values()}
    for entry in used:
        if len(choices[entry]) != 1:
            raise UserError(f"{source}: table: task entry {entry} ({entries[entry]['name']}) expands to "
                            f"{len(choices[entry])} parameter sets -- give each set its own entry")
    columns = [Column(h, numeric=False) for h in ("Dataset", "Backbone", "K", "Row")]
    columns += [Column(METRIC_HEADERS[m], group=g) for g in groups for m in metrics]
    out = Table(title, columns)
    stored, labels = {}, {}
    for entry in used:
        one = Grid(grid.backbones, choices[entry], grid.datasets, grid.ks, grid.seeds, grid.protocol)
        for cfg in expand(one, runner):
            run = runner.resolve(cfg)
            labels[entry] = task_label(run.config)
            stored[(entry, cfg.dataset, cfg.data_root, cfg.dataset_options, cfg.backbone, cfg.k, cfg.seed)] = \
                (runner.store.get(run.config_hash), run.config)
    blocks = list(dict.fromkeys(key[1:-1] for key in stored))  # the grid's order: dataset, backbone, K
    missing = set()
    for dataset, root, options, backbone, k in blocks:
        for label, cells in rows:
            values, random, column = [], False, None
            for group in groups:
                ref = cells.get(group)
                runs = [] if ref is None else [stored.get((ref[0], dataset, root, options, backbone, k, seed))
                                               for seed in grid.seeds]
                records = [r for r, _ in runs if r is not None]
                missing |= {(ref[0], dataset, root, options, backbone, k, seed)
                            for seed, (r, _) in zip(grid.seeds, runs) if r is None}
                random |= any(r["random_weights"] for r in records)
                for metric in metrics:
                    found = [metric_value(r, metric, ref[1], "all")[0] for r in records]
                    mean, std, n = _mean_std([v for v in found if v is not None])
                    values.append(Cell(mean, std, n))
                if runs:
                    column = column or _column_text(runs[0][1])
            out.add([Cell(column or dataset), Cell(backbone), Cell(str(k)), Cell(label)] + values, random=random,
                    group=(dataset, root, options, backbone, k))
    refs = "; ".join(f"{label}: " + ", ".join(f"{g} = {labels[e]} [{s}]" for g, (e, s) in cells.items())
                     for label, cells in rows)
    notes = [f"Cells (task [stream]): {refs}.",
             "Each value is the stored run's score of that stream, its clusters or classes matched to the ground "
             "truth by the protocol as every ssl-bench score (Hungarian at K = C; a head's linear stream is also "
             "stored unmatched, in stats.class_id_scores); a blank: not stored yet (ssl-bench sweep FILE)."]
    if missing:
        notes.append(f"{len(missing)} run(s) of this table are not stored yet.")
    return out.finish(notes)


def _column_text(config: dict) -> str:
    options = "".join(f", {k}={v}" for k, v in sorted((config.get("dataset_options") or {}).items()))
    return f"{config['dataset']}:{config['split']} ({config['images']} images{options})"
