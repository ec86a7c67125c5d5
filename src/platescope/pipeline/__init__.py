"""The detect job as a Ray Data graph: decode tasks, detector actors, a resumable shard sink."""
