"""`slmforge quickstart`: the whole pipeline in one verb (pipeline.py; the verb: commands.py)."""
