"""prep/ — the data pipeline: raw text in, tokenized training shards out.

Documents flow between steps as {"id", "text", "meta"} dicts stored as JSONL (gzip
allowed). Every step accounts for every document (in = kept + removed + errored).
prep/ uses numpy, tokenizers and the standard library; it never imports model code.
"""
