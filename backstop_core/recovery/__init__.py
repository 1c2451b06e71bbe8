"""Recovery: restore to a side table, validate, and only then copy back; drills and PITR.

- `restore.restore_to_side_table`: a snapshot's table -> `<schema>.<table>__restored_<id>`
- `validate.validate_restore`: row count, checksum, columns and types, primary key,
  constraints, foreign keys, each pass/fail with its numbers
- `copyback.diff_table`, `copyback.build_copy_back`, `copyback.apply_copy_back`: what
  differs from the live table, the SQL that puts rows back, and running it (audited)
- `wizard.Recovery`: the whole flow step by step, for the CLI and the TUI
- `drill.run_drills`, `drill.drill_loop`, `drill.last_drills`: restore drills into a
  scratch schema, recorded in the state store
- `pitr.check_pitr`, `pitr.recovery_target`: WAL archiving status; where replay stops
- `cli_commands.register`: `backstop recover`, `backstop drill`, `backstop pitr`

Import from the modules: this package imports nothing itself, so the command line stays
quick to start.
"""
