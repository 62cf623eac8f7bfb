"""The command line: `main` (dispatch and exit codes), `args` (the parser), `serve` (the
server's start, banner and shutdown), `commands` (`replay` and `export`), `progress` (progress
lines), `replay` (fixture files in and out), `report` (the per-session summary) and `logs`
(terminal logging)."""
