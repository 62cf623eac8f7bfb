"""The command line: `main` (serve, replay, export), `replay` (fixture files in and out),
`report` (the per-session summary) and `logs` (terminal logging)."""
