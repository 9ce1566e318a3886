"""Validation against the schemas: precise errors that name the file, row, column and what was expected."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class FieldProblem:
    """One problem with one cell: where it is and what was expected there."""

    file: str
    row: int | None  # 0-based data row (header excluded); None when the problem is the whole column
    column: str
    expected: str
    got: str

    def __str__(self) -> str:
        where = f"{self.file}" + (f", row {self.row}" if self.row is not None else "")
        return f"{where}, column {self.column!r}: expected {self.expected}, got {self.got}"


class SchemaError(ValueError):
    """A file does not fit a schema. `problems` lists each offending cell or column."""

    def __init__(self, problems: list[FieldProblem], hint: str = ""):
        self.problems = problems
        lines = [str(p) for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"... and {len(problems) - 20} more")
        super().__init__("\n".join(lines) + (f"\nfix: {hint}" if hint else ""))


class WrongFileError(ValueError):
    """A manifest that is not of the expected dataset at all (wrong format or missing required columns)."""

    def __init__(self, file: str, dataset: str, missing: Iterable[str] = (), reason: str = "", fix: str = ""):
        self.file, self.dataset, self.missing = file, dataset, tuple(missing)
        what = reason or f"missing required columns {list(self.missing)}"
        hint = fix or f"point the {dataset} source at a {dataset} manifest"
        super().__init__(f"{file}: not a {dataset} manifest: {what}. fix: {hint}")


def check_required_columns(file: str, dataset: str, columns: Iterable[str], required: Iterable[str]) -> None:
    """Raise WrongFileError naming every required column that `columns` lacks."""
    present = set(columns)
    missing = [c for c in required if c not in present]
    if missing:
        raise WrongFileError(file, dataset, missing)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select `schema`'s columns in order, cast them, and add absent optional ones as nulls.

    Extra columns are dropped. Raises SchemaError (column-level) when a column cannot be cast or a
    non-nullable one is absent.
    """
    arrays, problems = [], []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                problems.append(
                    FieldProblem("<table>", None, field.name, f"a {field.type} column", "no column")
                )
                continue
            arrays.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        try:
            arrays.append(column.cast(field.type) if column.type != field.type else column)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            problems.append(
                FieldProblem("<table>", None, field.name, str(field.type), f"{column.type} ({exc})")
            )
    if problems:
        raise SchemaError(problems)
    return pa.Table.from_arrays(arrays, schema=schema)


def validate_table(table: pa.Table, schema: pa.Schema, file: str = "<table>") -> list[FieldProblem]:
    """Every problem of `table` against `schema`: missing columns, uncastable cells, nulls in required fields.

    Cells are checked one at a time only for columns whose bulk cast fails, so a valid table costs one
    cast per column.
    """
    problems: list[FieldProblem] = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                problems.append(FieldProblem(file, None, field.name, f"a {field.type} column", "no column"))
            continue
        column = table.column(field.name)
        try:
            cast = column.cast(field.type) if column.type != field.type else column
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for i, value in enumerate(column.to_pylist()):
                if value is None:
                    if not field.nullable:
                        problems.append(FieldProblem(file, i, field.name, f"a non-null {field.type}", "null"))
                    continue
                try:
                    pa.array([value]).cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    problems.append(FieldProblem(file, i, field.name, str(field.type), repr(value)))
            continue
        if not field.nullable and cast.null_count:
            for i in pc.indices_nonzero(pc.is_null(cast)).to_pylist():
                problems.append(FieldProblem(file, i, field.name, f"a non-null {field.type}", "null"))
    return problems


def validate_or_raise(table: pa.Table, schema: pa.Schema, file: str = "<table>", hint: str = "") -> pa.Table:
    """`conform(table, schema)` after `validate_table` found nothing; else SchemaError listing the problems."""
    problems = validate_table(table, schema, file)
    if problems:
        raise SchemaError(problems, hint)
    return conform(table, schema)
