"""Code shared by the pipeline steps: configuration, the log contract, models, policies, statistics."""
