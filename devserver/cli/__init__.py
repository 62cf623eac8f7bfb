"""The command line: `main` (dispatch and exit codes), `args` (the parser), `serve` (the
server's start, banner and shutdown), `commands` (`replay` and `export`), `progress` (progress
lines), `replay` (fixture files run in-process, and a session exported as one; over
`fixture_files`, reading them, and `sending`, to a running server), `report` (the per-session
summary) and `logs` (terminal logging)."""
