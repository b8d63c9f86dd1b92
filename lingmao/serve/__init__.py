"""A local web page and JSON API for a trained model: `python -m lingmao.serve model_dir=DIR`.

The modules: `limits` (what one request may ask, how much work is taken on), `requests` (a request checked and
turned into generation options), `jobs` (a request's generation and its result), `batcher` (the one thread that
decodes every request in flight together, with a bounded queue), `marks` (the tone and rhyme marks of a poem as
JSON), `guards` (Host, Origin and body size, checked before a request is read), `app` (the FastAPI routes),
`__main__` (the Hydra app that loads the model, runs uvicorn and stops cleanly), and `static/` (the page). `app`,
`guards`, `requests` (pydantic) and `__main__` need the `serve` extra (FastAPI, uvicorn); the others do not.
"""
