"""The run folder and its checkpoint format, read and written in one place (docs/run-folder.md).

meta.py is meta.json as one typed record (CheckpointMeta); reading.py opens a run or checkpoint folder
of any family (meta, model, tokenizer, checks); writing.py writes step folders (`.partial`, checksums
last, `latest`); safe_dcp.py reads sharded (DCP) checkpoints without running code from them. The
sharded writer needs the process group, so it stays with training (train/sharded.py).
"""
