"""The openai SDK's own test suite run on the guarded clients (see ``run.py``)."""
