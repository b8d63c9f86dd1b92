"""A local web page and JSON API for a trained model: `python -m lingmao.serve model_dir=DIR`.

The modules: `limits` (what one request may ask), `requests` (a request checked and turned into generation
options), `marks` (the tone and rhyme marks of a poem as JSON), `jobs` (one generation on a worker thread, its
characters as events), `app` (the FastAPI routes), `__main__` (the Hydra app that loads the model and runs
uvicorn), and `static/` (the page). `app`, `requests` (pydantic) and `__main__` need the `serve` extra (FastAPI,
uvicorn); the others do not.
"""
