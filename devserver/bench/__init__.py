"""The benchmark: `python -m devserver.bench` (see `run`). `app` is the trivial function the
end-to-end rows run; `bare` is the bare aiohttp handler the ratios are measured against."""
